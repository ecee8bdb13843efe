"""Token sampling from logits: temperature, top-k, top-p and the `SamplingConfig` knobs.

Everything here works on the last dimension of any leading shape and never syncs with the
device (no `.item()`), so it can run inside `torch.compile` and CUDA graphs. Guidance lives
in `guidance.py`; `GuidanceSchedule` and `guided_logits` are re-exported here.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import Config, check_range
from .guidance import GuidanceKind, GuidanceSchedule, guided_logits

__all__ = ["SamplingConfig", "GuidanceSchedule", "guided_logits", "apply_temperature", "top_k_filter",
           "top_p_filter", "exponential_noise", "sample_from_logits"]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature` for temperature > 0 (temperature 0 is greedy: see `sample_from_logits`)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to scale logits")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits to -inf (ties with the k-th are kept); k=0 disables."""
    if k < 0:
        raise ValueError(f"top_k={k} must be >= 0")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (HF semantics).

    The most likely token is always kept; p=1.0 disables. Ties are broken by sort order.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p={p} is out of range (0, 1]")
    if p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Exp(1) draws (float32, > 0) for `sample_from_logits(noise=...)`.

    Drawing them outside a compiled or CUDA-graphed step keeps the step free of generator state.
    """
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def sample_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one index per row of `logits` (..., V) -> LongTensor (...).

    Temperature, then top-k, then top-p (the HF/VAR order); temperature 0 is argmax. Sampling
    is the exponential race `argmax(probs / E)`, E ~ Exp(1), which draws exactly from `probs`.
    E is `noise` when given (from `exponential_noise`, shaped like `logits`), else drawn with
    `generator` (on the logits' device), so results are reproducible given either.
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator to sample_from_logits, not both")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != logits shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    probs = logits.float().softmax(dim=-1)
    if noise is None:
        noise = exponential_noise(probs.shape, generator, probs.device)
    return (probs / noise).argmax(dim=-1)


@dataclasses.dataclass
class SamplingConfig(Config):
    """Token sampling and classifier-free guidance settings shared by every sampler.

    `cfg` is the standard guidance weight w in `uncond + w * (cond - uncond)` (1 = no
    guidance), scheduled over the generation by `cfg_schedule` (see `GuidanceSchedule`).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg: float = 1.0
    cfg_schedule: GuidanceKind = "constant"
    cfg_interval_start: float = 0.0
    cfg_interval_end: float = 1.0
    cfg_min: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        check_range("temperature", self.temperature, 0.0, math.inf)
        check_range("top_k", self.top_k, 0, math.inf)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        GuidanceSchedule.from_config(self)
