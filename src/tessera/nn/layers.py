"""Small building blocks of the trunk: RMSNorm, SwiGLU, AdaLN modulation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .swiglu import swiglu


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, times `weight` if given, computed in float32, in x's dtype."""
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int) -> int:
    """LLaMA's hidden width: 2/3 of mlp_ratio*dim, rounded up to `multiple_of`."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), with w1 and w3 stored as one (2 * hidden, dim) matrix `w13` so that
    both projections are one matrix product (one kernel launch per block when decoding). `fused`:
    the activation and its backward as Triton kernels where they run (nn/swiglu.py)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, fused: bool = False):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(swiglu(self.w13(x), self.fused)))


class AdaLNModulation(nn.Module):
    """Maps a pooled condition (B, cond_dim) to `n` (B, 1, dim) modulation vectors, zero-initialised."""

    def __init__(self, cond_dim: int, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(cond_dim, n * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond)).unsqueeze(1).chunk(self.n, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift
