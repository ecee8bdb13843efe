"""Output heads and their losses, shared by generators."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, check_range
from ..nn.fused_cross_entropy import LOSS_KERNELS, LossKernel, fused_linear_cross_entropy
from ..nn.layers import AdaLNModulation, RMSNorm, SwiGLU, modulate


class TokenHead(nn.Module):
    """Linear classifier from trunk features to codebook logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE over all positions (+ z-loss on log Z), computed in float32; also accuracy."""
    flat = logits.float().flatten(0, -2)
    target = targets.flatten()
    ce = F.cross_entropy(flat, target, label_smoothing=label_smoothing)
    loss = ce
    logs = {"ce": ce.detach(), "acc": (flat.argmax(-1) == target).float().mean().detach()}
    if z_loss > 0:
        zl = torch.logsumexp(flat, dim=-1).pow(2).mean()
        loss = loss + z_loss * zl
        logs["z_loss"] = zl.detach()
    return loss, logs


@dataclass
class FusedLossConfig(Config):
    """The fused linear cross-entropy of a token-classifying generator: off (`loss_chunk=0`, full
    logits), or `loss_chunk` rows at a time in PyTorch (`loss_kernel=torch`; `compiled`: each chunk's
    step compiled by Inductor; `triton`: each chunk's terms and logit gradient by one Triton kernel
    where Triton runs, the PyTorch step elsewhere), or liger-kernel's Triton kernel
    (`loss_kernel=liger`, CUDA; it picks its own chunk size)."""

    loss_chunk: int = 0
    loss_kernel: LossKernel = "torch"

    def validate(self) -> None:
        super().validate()
        check_range("loss_chunk", self.loss_chunk, 0)
        if self.loss_kernel not in LOSS_KERNELS:
            raise ConfigError(f"loss_kernel={self.loss_kernel!r}; choose one of {', '.join(LOSS_KERNELS)}")
        if self.loss_kernel != "torch" and not self.loss_chunk:
            raise ConfigError(f"loss_kernel={self.loss_kernel} is a fused path: set loss_chunk > 0 too")


def head_cross_entropy(head: TokenHead, h: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                       z_loss: float = 0.0, chunk: int = 0, kernel: LossKernel = "torch"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`token_cross_entropy` of `head` over features h (..., dim) and targets (...); with `chunk` > 0
    the fused linear cross-entropy (`kernel`: see `FusedLossConfig`), never holding the full logits."""
    if chunk:
        return fused_linear_cross_entropy(h.flatten(0, -2), head.proj.weight, targets.flatten(), label_smoothing,
                                          z_loss, chunk, kernel)
    return token_cross_entropy(head(h), targets, label_smoothing, z_loss)


FlowTimeSampling = Literal["uniform", "logit_normal"]


def expand_left(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so `t` (a prefix of a shape) broadcasts against `ndim` dims."""
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N,) -> (N, dim) in float32 (cos half, then sin half; `dim` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class FlowHeadBlock(nn.Module):
    """Residual SwiGLU block modulated by AdaLN (shift, scale, gate); the zero-initialised gate makes it identity."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = RMSNorm(width, affine=False)
        self.mlp = SwiGLU(width, width)
        self.ada = AdaLNModulation(width, width, 3)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h: (N, 1, width) one position per row; y: (N, width) time + condition embedding."""
        shift, scale, gate = self.ada(y)
        return h + gate * self.mlp(modulate(self.norm(h), shift, scale))


class FlowHead(nn.Module):
    """Per-position velocity MLP v(x_t, t, c) for flow matching, in the style of MAR's SimpleMLPAdaLN.

    x_t (..., latent_dim) is projected to `width`; the sinusoidal embedding of t (scaled by
    `time_scale`, through an MLP) plus a projection of the trunk output c (..., cond_dim)
    modulates `depth` residual blocks and the final norm through AdaLN. All AdaLN maps and
    the output projection start at zero, so the head outputs exactly zero at init. Time
    convention: t=0 is noise, t=1 is data (see `flow_matching_loss`).
    """

    time_freqs = 256
    time_scale = 1000.0

    def __init__(self, latent_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.input_proj = nn.Linear(latent_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(self.time_freqs, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(FlowHeadBlock(width) for _ in range(depth))
        self.final_norm = RMSNorm(width, affine=False)
        self.final_ada = AdaLNModulation(width, width, 2)
        self.out_proj = nn.Linear(width, latent_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        """x: (..., latent_dim); cond: (..., cond_dim); t: scalar or a prefix of x's leading shape
        (e.g. (B,) for x (B, N, D)). Returns the velocity shaped like x."""
        lead = x.shape[:-1]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = expand_left(t, len(lead)).expand(lead).reshape(-1)
        y = self.time_mlp(timestep_embedding(t * self.time_scale, self.time_freqs).to(x.dtype))
        y = y + self.cond_proj(cond.reshape(-1, cond.shape[-1]))
        h = self.input_proj(x.reshape(-1, 1, self.latent_dim))
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_ada(y)
        return self.out_proj(modulate(self.final_norm(h), shift, scale)).reshape(x.shape)


def sample_flow_times(shape: torch.Size | tuple[int, ...], sampling: FlowTimeSampling = "uniform",
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Training times in (0, 1): U(0, 1), or logit-normal sigmoid(N(0, 1)) (SD3) which favours mid times."""
    if sampling == "uniform":
        return torch.rand(shape, device=device)
    if sampling == "logit_normal":
        return torch.sigmoid(torch.randn(shape, device=device))
    raise ValueError(f"t_sampling={sampling!r} is not one of {list(get_args(FlowTimeSampling))}")


def flow_matching_loss(head: FlowHead, x1: torch.Tensor, cond: torch.Tensor, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, t_sampling: FlowTimeSampling = "uniform"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rectified-flow MSE on data latents x1 (..., D) with trunk outputs cond (..., cond_dim).

    Time convention: x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) (`noise`), so t=0 is noise
    and t=1 is data, and the target velocity is x1 - x0 (integrate t: 0 -> 1 to sample).
    `t` defaults to one draw per position (x1's leading shape) from `t_sampling`; a given `t`
    may be any prefix of that shape (e.g. (B,) for one time per sample). The mean squared
    error is computed in float32 and logged as `flow_mse`.
    """
    if t is None:
        t = sample_flow_times(x1.shape[:-1], t_sampling, x1.device)
    if noise is None:
        noise = torch.randn_like(x1)
    tx = expand_left(t, x1.dim()).to(x1.dtype)
    xt = tx * x1 + (1 - tx) * noise
    loss = (head(xt, t, cond).float() - (x1 - noise).float()).pow(2).mean()
    return loss, {"flow_mse": loss.detach()}
