"""Token-Shuffle: merge s x s neighbouring tokens along channels, and the inverse.

Grouping is exact index bookkeeping (`tokens_to_units` / `units_to_tokens`); the learned part
(`TokenShuffle`) compresses each token d -> d/s^2, concatenates the s^2 of a window into one
d-dim trunk token, and mirrors that after the trunk to predict the s^2 tokens of the next window.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import RMSNorm


def tokens_to_units(tokens: torch.Tensor, s: int) -> torch.Tensor:
    """(B, H, W, ...) -> (B, (H/s)*(W/s), s*s, ...): raster order over windows, raster inside."""
    b, h, w = tokens.shape[:3]
    if h % s or w % s:
        raise ValueError(f"token grid {h}x{w} is not divisible by the Token-Shuffle window {s}")
    rest = tokens.shape[3:]
    x = tokens.reshape(b, h // s, s, w // s, s, *rest).transpose(2, 3)
    return x.reshape(b, (h // s) * (w // s), s * s, *rest)


def units_to_tokens(units: torch.Tensor, grid: int, s: int) -> torch.Tensor:
    """Inverse of `tokens_to_units` for a square grid of side `grid`."""
    b, rest = units.shape[0], units.shape[3:]
    g = grid // s
    x = units.reshape(b, g, g, s, s, *rest).transpose(2, 3)
    return x.reshape(b, grid, grid, *rest)


class ResidualMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class TokenShuffle(nn.Module):
    """Learned merge (before the trunk) and unmerge (after it) for window s > 1."""

    def __init__(self, dim: int, s: int):
        super().__init__()
        if s < 2 or dim % (s * s):
            raise ValueError(f"Token-Shuffle needs s >= 2 and dim divisible by s*s (dim={dim}, s={s})")
        self.s2 = s * s
        self.compress = nn.Linear(dim, dim // self.s2)
        self.merge_mlps = nn.Sequential(ResidualMLP(dim), ResidualMLP(dim))
        self.unmerge_mlps = nn.Sequential(ResidualMLP(dim), ResidualMLP(dim))
        self.expand = nn.Linear(dim // self.s2, dim)

    def shuffle(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, G, s^2, dim) token embeddings -> (B, G, dim) trunk tokens."""
        return self.merge_mlps(self.compress(emb).flatten(2))

    def unshuffle(self, h: torch.Tensor) -> torch.Tensor:
        """(B, G, dim) trunk outputs -> (B, G, s^2, dim) per-token features for the head."""
        h = self.unmerge_mlps(h)
        return self.expand(h.unflatten(-1, (self.s2, -1)))
