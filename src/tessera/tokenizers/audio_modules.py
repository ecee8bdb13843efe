"""Convolutional pieces of the audio codec: SEANet encoder/decoder (EnCodec, SoundStream) and a
multi-scale STFT discriminator (EnCodec's MS-STFTD).

Strided convolutions use kernel 2 * stride and non-causal padding, so a length that is a multiple
of the hop maps to exactly length / hop frames and back.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

Norm = Literal["weight_norm", "none"]


def _normed(conv: nn.Module, norm: Norm) -> nn.Module:
    return weight_norm(conv) if norm == "weight_norm" else conv


class Conv(nn.Module):
    """Conv1d with "same"-style zero padding of (kernel - 1) * dilation - (stride - 1) samples, split
    evenly (the extra sample on the left): length L -> ceil(L / stride) when stride divides L."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1,
                 norm: Norm = "weight_norm"):
        super().__init__()
        self.conv = _normed(nn.Conv1d(in_ch, out_ch, kernel, stride=stride, dilation=dilation), norm)
        total = (kernel - 1) * dilation - (stride - 1)
        self.pad = (total - total // 2, total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class ConvTranspose(nn.Module):
    """ConvTranspose1d of kernel 2 * stride, trimmed to exactly stride x the input length."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: Norm = "weight_norm"):
        super().__init__()
        self.conv = _normed(nn.ConvTranspose1d(in_ch, out_ch, 2 * stride, stride=stride), norm)
        self.trim = (stride - stride // 2, stride // 2)  # kernel - stride = stride extra samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.trim[0]: y.shape[-1] - self.trim[1]]


class ResidualUnit(nn.Module):
    """SEANet residual unit: x + conv1(ELU(conv3_dilated(ELU(x)))), hidden width dim // 2."""

    def __init__(self, dim: int, dilation: int, norm: Norm):
        super().__init__()
        hidden = max(dim // 2, 1)
        self.block = nn.Sequential(nn.ELU(), Conv(dim, hidden, 3, dilation=dilation, norm=norm),
                                   nn.ELU(), Conv(hidden, dim, 1, norm=norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_units(dim: int, count: int, dilation_base: int, norm: Norm) -> list[nn.Module]:
    return [ResidualUnit(dim, dilation_base ** j, norm) for j in range(count)]


class SEANetEncoder(nn.Module):
    """(B, 1, T) -> (B, out_dim, T / prod(strides)). Width `channels` doubles at every strided level."""

    def __init__(self, channels: int, strides: tuple[int, ...], out_dim: int, residual_units: int = 1,
                 dilation_base: int = 2, norm: Norm = "weight_norm"):
        super().__init__()
        layers: list[nn.Module] = [Conv(1, channels, 7, norm=norm)]
        ch = channels
        for stride in strides:
            layers += _residual_units(ch, residual_units, dilation_base, norm)
            layers += [nn.ELU(), Conv(ch, 2 * ch, 2 * stride, stride=stride, norm=norm)]
            ch *= 2
        layers += [nn.ELU(), Conv(ch, out_dim, 7, norm=norm)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SEANetDecoder(nn.Module):
    """(B, in_dim, T') -> (B, 1, T' * prod(strides)), mirroring `SEANetEncoder` (strides reversed)."""

    def __init__(self, channels: int, strides: tuple[int, ...], in_dim: int, residual_units: int = 1,
                 dilation_base: int = 2, norm: Norm = "weight_norm"):
        super().__init__()
        ch = channels * 2 ** len(strides)
        layers: list[nn.Module] = [Conv(in_dim, ch, 7, norm=norm)]
        for stride in reversed(strides):
            layers += [nn.ELU(), ConvTranspose(ch, ch // 2, stride, norm=norm)]
            ch //= 2
            layers += _residual_units(ch, residual_units, dilation_base, norm)
        layers += [nn.ELU(), Conv(ch, 1, 7, norm=norm)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFTD: the complex STFT as 2 channels (real, imag) over (frames, bins),
    a Conv2d stack dilated in time and strided in frequency, one logit per (frame, bin) patch."""

    def __init__(self, n_fft: int, channels: int, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        convs = [nn.Conv2d(2, channels, (3, 9), padding=(1, 4))]
        for d in dilations:
            convs.append(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)))
        convs.append(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)))
        self.convs = nn.ModuleList(weight_norm(c) for c in convs)
        self.out = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 1, T) audio -> (logits, feature maps of every hidden layer)."""
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(x[:, 0].float(), self.n_fft, hop_length=self.n_fft // 4, window=self.window,
                              center=True, pad_mode="constant", return_complex=True)
        h = torch.stack([spec.real, spec.imag], 1).transpose(2, 3).to(self.out.weight.dtype)  # (B, 2, frames, bins)
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        return self.out(h), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """`STFTDiscriminator`s at several FFT sizes; returns one (logits, features) pair per scale."""

    def __init__(self, fft_sizes: tuple[int, ...], channels: int):
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(n, channels) for n in fft_sizes)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [d(x) for d in self.scales]
