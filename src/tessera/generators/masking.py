"""Mask schedules and mask drawing shared by masked training (generators) and decoding (samplers).

A schedule gamma(r) maps progress r in [0, 1] to the fraction of tokens still masked: 1 at r=0,
0 at r=1. Training draws r ~ U(0, 1) per sample and masks gamma(r) of the tokens (MaskGIT,
MAGNeT); decoding leaves gamma((t + 1) / T) of the initially unknown tokens masked after step t.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import torch

from ..config import ConfigError

MaskSchedule = Literal["cosine", "linear", "square", "arccos"]


def mask_ratio(schedule: MaskSchedule, r: torch.Tensor) -> torch.Tensor:
    """gamma(r): cosine cos(pi r / 2) (MaskGIT, MAGNeT), linear 1 - r, square 1 - r^2, arccos 2 arccos(r) / pi."""
    r = r.clamp(0.0, 1.0)
    if schedule == "cosine":
        return torch.cos(r * math.pi / 2)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r * r
    if schedule == "arccos":
        return torch.arccos(r) * 2 / math.pi
    raise ConfigError(f"mask schedule {schedule!r} is not one of {list(get_args(MaskSchedule))}")


def masked_after_step(schedule: MaskSchedule, unknown: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """How many of `unknown` (per row) initially unknown units stay masked after decoding step `step`."""
    if step + 1 >= steps:
        return torch.zeros_like(unknown)
    ratio = mask_ratio(schedule, torch.tensor((step + 1) / steps, dtype=torch.float64))
    return torch.floor(unknown.double() * ratio.to(unknown.device)).long()


def random_token_mask(ratios: torch.Tensor, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, length) bool: round(ratio * length) random positions per row, at least one."""
    counts = (ratios * length).round().long().clamp(1, length)
    scores = torch.rand(ratios.shape[0], length, generator=generator, device=ratios.device)
    ranks = scores.argsort(1).argsort(1)
    return ranks < counts[:, None]


@functools.lru_cache(maxsize=64)
def span_count_table(length: int, span: int) -> tuple[int, ...]:
    """For each percentage m in 0..100, the fewest span starts u whose expected union covers at least
    m% of `length` frames: 1 - C(T - L, u) / C(T, u) >= m / 100 (MAGNeT, appendix C)."""
    table, u, keep = [], 0, 1.0  # keep = prod_{j < u} (T - L - j) / (T - j): chance a frame stays unmasked
    for percent in range(101):
        while 1.0 - keep < percent / 100 and u < length:
            keep *= max(length - span - u, 0) / (length - u)
            u += 1
        table.append(max(u, 1))
    return tuple(table)


def span_mask(ratios: torch.Tensor, length: int, span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, length) bool: per row, u random span starts (u from `span_count_table` for its ratio),
    each masking `span` frames to its right (clipped at the end); span=1 is a plain token mask."""
    if span <= 1:
        return random_token_mask(ratios, length, generator)
    table = torch.tensor(span_count_table(length, span), device=ratios.device)
    starts_per_row = table[(ratios * 100).round().long().clamp(0, 100)]
    scores = torch.rand(ratios.shape[0], length, generator=generator, device=ratios.device)
    starts = scores.argsort(1).argsort(1) < starts_per_row[:, None]
    # dilate each start by span - 1 frames to the right
    padded = torch.nn.functional.pad(starts.float()[:, None], (span - 1, 0))
    return torch.nn.functional.max_pool1d(padded, span, stride=1)[:, 0].bool()
