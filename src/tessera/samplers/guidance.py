"""Classifier-free guidance: one schedule of the standard weight w, shared by every sampler."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal, get_args

import torch

from ..config import ConfigError, check_range

if TYPE_CHECKING:
    from .logits import SamplingConfig

GuidanceKind = Literal["constant", "linear", "muse", "decreasing", "increasing", "interval", "half_linear"]


def guided_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """`uncond + w * (cond - uncond)`; w=1 returns exactly `cond`, w=0 exactly `uncond`.

    `w` may be a tensor broadcastable to the logits (one weight per row).
    """
    return torch.lerp(uncond_logits, cond_logits, w)


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    """The guidance weight w as a function of generation progress, always in standard form.

    Every sampler combines `logits = uncond + w * (cond - uncond)` (w=1: no guidance) with
    `w = schedule.weight(progress)`, where `progress` in [0, 1] is the fraction of the
    generation done: token j of n in an AR loop is `j / (n - 1)`, scale `si` of S in VAR is
    `si / (S - 1)`, and a masked step is the fraction of revealed tokens.

    Kinds, and the peer conventions each one reproduces:

    - `constant`: w everywhere. LlamaGen's `cfg_scale`, Muse/aMUSEd `guidance_scale` and
      MusicGen's `cfg_coef` are already standard w.
    - `linear`: 1 -> w linearly in progress. VAR writes `(1 + t) * cond - t * uncond` with
      `t = cfg * si / (S - 1)`, i.e. w = 1 + t: VAR's "cfg=1.5" is w = 2.5 at the last scale
      (use `from_var_cfg`). FlowAR/xAR's `(cfg - 1) * step / (S - 1) + 1` is this with w = cfg.
    - `muse`: 1 + (w - 1) * revealed_fraction (MaskGIT/MAR "linear" CFG). The formula is
      `linear`'s; the name records that a masked sampler's progress is the revealed fraction.
    - `decreasing`: w at progress 0 -> `w_min` at 1. MAGNeT anneals with the mask rate m,
      `m * max_cfg_coef + (1 - m) * min_cfg_coef`; with progress = 1 - m that is w =
      `max_cfg_coef`, `w_min` = `min_cfg_coef` (10 and 1 in audiocraft).
    - `increasing`: `w_min` at progress 0 -> w at 1. ENAT writes `cond + s * (cond - uncond)`
      with s = `cfg_scale * step / T`, i.e. w = 1 + s: ENAT's `cfg_scale` is w - 1, w_min = 1.
    - `interval`: w for progress inside `interval` (closed), 1 outside. LlamaGen's
      `cfg_interval` (guidance off after token i) is `interval=(0, i / (n - 1))`; FlowAR's
      guidance interval is this schedule evaluated on the flow time rather than on scales.
    - `half_linear`: Token-Shuffle's ramp 1 -> w over the first half, then w.

    `interval` is accepted only by the `interval` kind and `w_min` only by `decreasing` and
    `increasing`: setting them for another kind raises rather than being silently ignored.
    """

    kind: GuidanceKind = "constant"
    w: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    w_min: float = 1.0

    def __post_init__(self) -> None:
        """Range checks; messages name the matching `SamplingConfig` fields."""
        if self.kind not in get_args(GuidanceKind):
            raise ConfigError(f"cfg_schedule={self.kind!r} is not one of {list(get_args(GuidanceKind))}")
        check_range("cfg", self.w, 0.0, math.inf)
        check_range("cfg_min", self.w_min, 0.0, math.inf)
        start, end = self.interval
        check_range("cfg_interval_start", start, 0.0, 1.0)
        check_range("cfg_interval_end", end, start, 1.0)
        if self.kind != "interval" and self.interval != (0.0, 1.0):
            raise ConfigError(f"cfg_interval_start/cfg_interval_end={self.interval} need cfg_schedule=interval, "
                              f"not {self.kind!r}")
        if self.kind not in ("decreasing", "increasing") and self.w_min != 1.0:
            raise ConfigError(f"cfg_min={self.w_min} needs cfg_schedule=decreasing or increasing, not {self.kind!r}")

    @classmethod
    def from_var_cfg(cls, cfg: float) -> GuidanceSchedule:
        """VAR's `cfg` (t ramps 0 -> cfg over scales) as the standard linear schedule 1 -> 1 + cfg."""
        return cls("linear", 1.0 + cfg)

    @classmethod
    def from_config(cls, settings: SamplingConfig) -> GuidanceSchedule:
        """The schedule named by a `SamplingConfig`'s `cfg*` fields."""
        return cls(settings.cfg_schedule, settings.cfg, (settings.cfg_interval_start, settings.cfg_interval_end),
                   settings.cfg_min)

    def weight(self, progress: float) -> float:
        """The standard guidance weight w at `progress` in [0, 1]."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress={progress} is out of range [0, 1]")
        w = self.w
        if self.kind in ("linear", "muse"):
            return 1.0 + (w - 1.0) * progress
        if self.kind == "decreasing":
            return w + (self.w_min - w) * progress
        if self.kind == "increasing":
            return self.w_min + (w - self.w_min) * progress
        if self.kind == "interval":
            start, end = self.interval
            return w if start <= progress <= end else 1.0
        if self.kind == "half_linear":
            return 1.0 + (w - 1.0) * min(1.0, 2.0 * progress)
        return w
