"""KV-cached (and uncached reference) left-to-right sampling for autoregressive generators."""
from __future__ import annotations

from typing import Callable

import torch

from ..generators.base import AutoregressiveGenerator, Condition
from ..generators.conditioning import condition_size
from .logits import GuidanceSchedule, SamplingConfig, guided_logits, sample_from_logits

UnitCallback = Callable[[int, torch.Tensor], None]


class AutoregressiveSampler:
    """Samples units one at a time with temperature, top-k/top-p and scheduled CFG.

    CFG runs as a doubled batch (conditional rows, then null-condition rows); the weight for
    unit j is `schedule.weight(j / (n_units - 1))` in the standard form
    `uncond + w * (cond - uncond)`. `on_unit(j, units_so_far)` is called after each unit
    (progressive previews).
    """

    def __init__(self, settings: SamplingConfig, use_cache: bool = True, on_unit: UnitCallback | None = None):
        self.settings = settings
        self.schedule = GuidanceSchedule.from_config(settings)
        self.use_cache = use_cache
        self.on_unit = on_unit

    @torch.no_grad()
    def __call__(self, model: AutoregressiveGenerator, cond: Condition) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = condition_size(cond)
        guided = model.has_condition and self.settings.cfg != 1.0
        keep = torch.zeros(batch, dtype=torch.bool, device=device)
        prefix = model.prefix_embeddings(cond, keep)
        if guided:
            prefix = torch.cat([prefix, model.prefix_embeddings(cond, ~keep)])
        generator = torch.Generator(device).manual_seed(self.settings.seed)
        n = model.n_units
        units = torch.zeros(batch, n, model.unit_size, dtype=torch.long, device=device)
        cache = model.new_cache(prefix.shape[0], prefix.dtype, device) if self.use_cache else None
        logits = model.prefill(prefix, cache) if cache is not None else None
        for j in range(n):
            if cache is None:
                so_far = units[:, :j].repeat(2 if guided else 1, 1, 1)
                logits = model.logits_all(prefix, so_far)[:, j]
            step_logits = logits.float()
            if guided:
                cond_logits, uncond_logits = step_logits.chunk(2)
                weight = self.schedule.weight(j / max(n - 1, 1))
                step_logits = guided_logits(cond_logits, uncond_logits, weight)
            units[:, j] = sample_from_logits(step_logits, temperature=self.settings.temperature,
                                             top_k=self.settings.top_k, top_p=self.settings.top_p,
                                             generator=generator)
            if self.on_unit is not None:
                self.on_unit(j, units[:, : j + 1])
            if cache is not None and j < n - 1:
                fed = units[:, j].repeat(2, 1) if guided else units[:, j]
                logits = model.decode_step(fed, j, cache)
        return units
