"""Convolutional pieces of the VQ tokenizer: ResNet encoder/decoder and a PatchGAN discriminator."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, in_ch, H, W) -> (B, z_ch, H/f, W/f) with f = 2**(len(channel_mult) - 1)."""

    def __init__(self, in_ch: int, base: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 z_ch: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        layers: list[nn.Module] = []
        ch = base
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base * mult, groups))
                ch = base * mult
            if level < len(channel_mult) - 1:
                layers.append(Downsample(ch))
        layers += [ResBlock(ch, ch, groups), ResBlock(ch, ch, groups)]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, z_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """(B, z_ch, h, w) -> (B, out_ch, h*f, w*f), mirroring `Encoder` (one extra ResBlock per level)."""

    def __init__(self, out_ch: int, base: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 z_ch: int, groups: int):
        super().__init__()
        ch = base * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_ch, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch, groups), ResBlock(ch, ch, groups)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, base * mult, groups))
                ch = base * mult
            if level > 0:
                layers.append(Upsample(ch))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming style): `layers` stride-2 4x4 convs, then two stride-1 ones -> one logit
    per patch. GroupNorm instead of BatchNorm: no running statistics, so it behaves the same under DDP
    and inside `torch.func.functional_call`."""

    def __init__(self, in_ch: int, channels: int, layers: int):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_ch, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            mods += [nn.Conv2d(ch, out, 4, stride=2 if n < layers else 1, padding=1),
                     nn.GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _groups(ch: int, most: int = 32) -> int:
    """The largest group count <= `most` that divides `ch`."""
    return next(g for g in range(min(most, ch), 0, -1) if ch % g == 0)
