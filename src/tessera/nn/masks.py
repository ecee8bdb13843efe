"""Attention masks as functions of absolute positions.

A mask answers "may query position q attend to key position k?". Because it is defined on
absolute positions, the same mask serves a full forward pass, a FlexAttention block mask and
incremental decoding against a preallocated KV cache (unwritten slots are always in the
future of the query, so they are masked out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MaskKind = Literal["causal", "bidirectional", "block_causal", "window_sink", "band"]


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """One of: causal, bidirectional, block-causal (by per-position block id), window+sink, band.

    `band` is bidirectional within `window` positions either side (MAGNeT's restricted context for
    its finer codebooks), plus the first `n_sink` positions (e.g. condition tokens) seen by all.
    """

    kind: MaskKind
    block_ids: torch.Tensor | None = None  # block_causal: (L,) non-decreasing block index per position
    block_sizes: tuple[int, ...] | None = None  # block_causal: the same blocks' lengths, known on the host
    window: int = 0  # window_sink: a query sees the last `window` positions (itself included); band: |q - k| <= window
    n_sink: int = 0  # window_sink: ... plus the first `n_sink` positions

    @staticmethod
    def causal() -> "AttentionMask":
        return AttentionMask("causal")

    @staticmethod
    def bidirectional() -> "AttentionMask":
        return AttentionMask("bidirectional")

    @staticmethod
    def block_causal(block_sizes: list[int], device: torch.device | str = "cpu") -> "AttentionMask":
        """Each position sees its own block and all earlier blocks (VAR's next-scale mask)."""
        ids = torch.repeat_interleave(torch.arange(len(block_sizes)), torch.tensor(block_sizes))
        return AttentionMask("block_causal", block_ids=ids.to(device), block_sizes=tuple(block_sizes))

    @staticmethod
    def window_sink(window: int, n_sink: int) -> "AttentionMask":
        if window < 1 or n_sink < 0:
            raise ValueError(f"window_sink needs window >= 1 and n_sink >= 0, got {window}, {n_sink}")
        return AttentionMask("window_sink", window=window, n_sink=n_sink)

    @staticmethod
    def band(window: int, n_sink: int = 0) -> "AttentionMask":
        if window < 0 or n_sink < 0:
            raise ValueError(f"band needs window >= 0 and n_sink >= 0, got {window}, {n_sink}")
        return AttentionMask("band", window=window, n_sink=n_sink)

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Broadcasting boolean rule on absolute positions (also a FlexAttention mask_mod body)."""
        if self.kind == "bidirectional":
            return (q_idx >= 0) & (kv_idx >= 0)
        if self.kind == "causal":
            return kv_idx <= q_idx
        if self.kind == "block_causal":
            # Slots past the last block (unused cache space) are never visible.
            last = self.block_ids.numel() - 1
            kv_block = self.block_ids[kv_idx.clamp(max=last)]
            return (kv_idx <= last) & (kv_block <= self.block_ids[q_idx.clamp(max=last)])
        if self.kind == "band":
            return ((q_idx - kv_idx).abs() <= self.window) | (kv_idx < self.n_sink)
        causal = kv_idx <= q_idx
        return causal & ((q_idx - kv_idx < self.window) | (kv_idx < self.n_sink))

    def dense(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (Lq, Lk) matrix for the given absolute query and key positions."""
        return self.allowed(q_pos[:, None], kv_pos[None, :])

    def to(self, device: torch.device | str) -> "AttentionMask":
        if self.block_ids is None or self.block_ids.device == torch.device(device):
            return self
        return AttentionMask(self.kind, self.block_ids.to(device), self.block_sizes, self.window, self.n_sink)
