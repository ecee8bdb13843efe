"""Rotary position embeddings over 1, 2 or more axes, at real-valued positions.

Positions are floats so that next-scale models can place a coarse scale's tokens on the
finest grid (scale-aware RoPE). A position of 0 on every axis is the identity rotation,
used for prefix (condition) tokens.
"""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for `head_dim` split evenly across `n_axes` position axes."""

    def __init__(self, head_dim: int, n_axes: int = 1, base: float = 10000.0):
        super().__init__()
        if head_dim % (2 * n_axes) != 0:
            raise ValueError(f"head_dim {head_dim} must be divisible by 2*n_axes={2 * n_axes} for RoPE")
        self.n_axes = n_axes
        per_axis = head_dim // (2 * n_axes)
        inv_freq = base ** (-torch.arange(per_axis, dtype=torch.float64) / per_axis)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (L, n_axes) -> (cos, sin), each (L, head_dim // 2), float32."""
        if positions.dim() == 1:
            positions = positions[:, None]
        if positions.shape[-1] != self.n_axes:
            raise ValueError(f"RoPE expects positions with {self.n_axes} axes, got shape {tuple(positions.shape)}")
        angles = positions.float()[:, :, None] * self.inv_freq[None, None, :]
        angles = angles.flatten(1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) by (L, D/2) tables, half-split (GPT-NeoX) convention."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
