"""KV-cached (and uncached reference) left-to-right sampling for autoregressive generators."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..generators.base import AutoregressiveGenerator, Condition
from ..generators.conditioning import condition_size
from .logits import GuidanceSchedule, SamplingConfig, exponential_noise, guided_logits, sample_from_logits

UnitCallback = Callable[[int, torch.Tensor], None]


class AutoregressiveSampler:
    """Samples units one at a time with temperature, top-k/top-p and scheduled CFG.

    CFG runs as a doubled batch (conditional rows, then null-condition rows); the weight for
    unit j is `schedule.weight(j / (n_units - 1))` in the standard form
    `uncond + w * (cond - uncond)`. `on_unit(j, units_so_far)` is called after each unit.

    `compile=True` (CUDA) compiles one decode step (trunk step + guidance + filtering +
    sampling) with CUDA-graph replay (`mode="reduce-overhead"`); the cache tensors are marked
    as static addresses so the graph may update them in place. `kv_bucket=0` attends over the
    whole static cache (one graph); `kv_bucket=b` attends over the first multiple of `b` slots
    past the current position (less memory read per step, one graph per bucket). The same
    function runs eagerly otherwise, so compiled and eager sampling draw the same tokens up to
    numerics.
    """

    def __init__(self, settings: SamplingConfig, use_cache: bool = True, on_unit: UnitCallback | None = None,
                 compile: bool = False, kv_bucket: int = 64):
        if kv_bucket < 0:
            raise ValueError(f"kv_bucket={kv_bucket} must be >= 0 (0: attend over the whole cache)")
        self.settings = settings
        self.schedule = GuidanceSchedule.from_config(settings)
        self.use_cache = use_cache
        self.on_unit = on_unit
        self.compile = compile
        self.kv_bucket = kv_bucket
        self._compiled: dict[tuple, tuple] = {}

    def _sample(self, logits: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor, guided: bool) -> torch.Tensor:
        logits = logits.float()
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            logits = guided_logits(cond_logits, uncond_logits, weight)
        s = self.settings
        return sample_from_logits(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, noise=noise)

    def _step_function(self, model: AutoregressiveGenerator, cache, guided: bool):
        """One decode step bound to this model and cache (compiled once per model/cache)."""
        key = (id(model), id(cache), guided)
        if key not in self._compiled:
            def step(unit, index, weight, noise, kv_len: int | None):
                fed = unit.repeat(2, 1) if guided else unit
                return self._sample(model.decode_step(fed, index, cache, kv_len), weight, noise, guided)
            fn = _compile_step(step, cache) if self.compile else step
            self._compiled = {key: (cache, fn)}
        return self._compiled[key][1]

    @torch.no_grad()
    def __call__(self, model: AutoregressiveGenerator, cond: Condition) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = condition_size(cond)
        n = model.n_units
        weights = [self.schedule.weight(j / max(n - 1, 1)) for j in range(n)]
        guided = model.has_condition and any(w != 1.0 for w in weights)
        keep = torch.zeros(batch, dtype=torch.bool, device=device)
        prefix = model.prefix_embeddings(cond, keep)
        if guided:
            prefix = torch.cat([prefix, model.prefix_embeddings(cond, ~keep)])
        dtype = next(model.trunk.parameters()).dtype
        prefix = prefix.to(dtype)
        generator = torch.Generator(device).manual_seed(self.settings.seed)
        size, vocab = model.unit_size, model.config.vocab_size
        units = torch.zeros(batch, n, size, dtype=torch.long, device=device)
        weights = torch.tensor(weights, device=device)
        cache = self._cache(model, prefix.shape[0], dtype, device) if self.use_cache else None
        step = self._step_function(model, cache, guided) if cache is not None else None
        p = prefix.shape[1]
        for j in range(n):
            noise = exponential_noise((batch, size, vocab), generator, device)
            if cache is None:
                so_far = units[:, :j].repeat(2 if guided else 1, 1, 1)
                units[:, j] = self._sample(model.logits_all(prefix, so_far)[:, j], weights[j], noise, guided)
            elif j == 0:
                units[:, 0] = self._sample(model.prefill(prefix, cache), weights[0], noise, guided)
            else:
                kv_len = min(cache.max_len, math.ceil((p + j) / self.kv_bucket) * self.kv_bucket) \
                    if self.kv_bucket else None
                index = torch.full((1,), j - 1, device=device)
                units[:, j] = step(units[:, j - 1], index, weights[j], noise, kv_len)
            if self.on_unit is not None:
                self.on_unit(j, units[:, : j + 1])
        return units

    def _cache(self, model: AutoregressiveGenerator, batch: int, dtype: torch.dtype, device: torch.device):
        """Reuse the compiled step's cache for the same model/batch (stale slots are masked)."""
        for (model_id, _, _), (cache, _) in self._compiled.items():
            if model_id == id(model) and cache.batch_size == batch and cache.dtype == dtype:
                return cache
        return model.new_cache(batch, dtype, device)


def _compile_step(step: Callable[..., torch.Tensor], cache) -> Callable[..., torch.Tensor]:
    """`step` compiled for CUDA-graph replay: the cache is a static address updated in place, each
    call starts a new cudagraph step, and the output is cloned out of the graph's memory pool."""
    for buffer in cache.buffers():
        torch._dynamo.mark_static_address(buffer)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def run(*args) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()
    return run
