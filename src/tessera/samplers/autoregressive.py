"""KV-cached (and uncached reference) sampling loops: next-token (unit by unit) and next-scale
(scale by scale)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..generators.base import AutoregressiveGenerator, Condition, ScaleWiseGenerator
from ..generators.conditioning import condition_size
from .logits import GuidanceSchedule, SamplingConfig, exponential_noise, guided_logits, sample_from_logits

UnitCallback = Callable[[int, torch.Tensor], None]


def draw(logits: torch.Tensor, weight: torch.Tensor | float, noise: torch.Tensor, guided: bool,
         settings: SamplingConfig) -> torch.Tensor:
    """Token ids from logits: CFG over a doubled batch (conditional rows first) when `guided`,
    then temperature, top-k, top-p and sampling with the given exponential noise."""
    logits = logits.float()
    if guided:
        cond_logits, uncond_logits = logits.chunk(2)
        logits = guided_logits(cond_logits, uncond_logits, weight)
    return sample_from_logits(logits, temperature=settings.temperature, top_k=settings.top_k,
                              top_p=settings.top_p, noise=noise)


def doubled_condition(model, cond: Condition, guided: bool, embed: Callable) -> torch.Tensor:
    """`embed(cond, drop)` for the batch, with the null-condition copy appended when `guided`."""
    device = next(model.parameters()).device
    keep = torch.zeros(condition_size(cond), dtype=torch.bool, device=device)
    out = embed(cond, keep)
    return torch.cat([out, embed(cond, ~keep)]) if guided else out


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
        return draw(logits, weight, noise, guided, self.settings)

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
        prefix = doubled_condition(model, cond, guided, model.prefix_embeddings)
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


ScaleCallback = Callable[[int, torch.Tensor], None]
ScaleEmitter = Callable[[torch.Tensor, int, float, bool, torch.Generator], torch.Tensor]


def run_scales(model: ScaleWiseGenerator, cond: Condition, schedule: GuidanceSchedule, emit: ScaleEmitter,
               use_cache: bool = True, on_scale: ScaleCallback | None = None, seed: int = 0) -> list[torch.Tensor]:
    """The coarse-to-fine loop shared by next-scale samplers; returns the units of every scale.

    For each scale k: build its inputs from the state, run the trunk (with the KV cache, or
    uncached over all scales so far), turn the outputs into units with
    `emit(outputs, k, weight, guided, generator)` and fold them into the state. The CFG weight of
    scale k is `schedule.weight(k / (K - 1))`; when any weight differs from 1 the condition runs
    as a doubled batch (conditional rows first). `on_scale(k, state)` sees each new state.
    """
    device = next(model.parameters()).device
    n = len(model.scales)
    weights = [schedule.weight(k / max(n - 1, 1)) for k in range(n)]
    guided = model.has_condition and any(w != 1.0 for w in weights)
    dtype = next(model.trunk.parameters()).dtype
    cond_vec = doubled_condition(model, cond, guided, model.condition_vector).to(dtype)
    cache = model.new_cache(cond_vec.shape[0], dtype, device) if use_cache else None
    generator = torch.Generator(device).manual_seed(seed)
    state, inputs, units = None, [], []
    for k, size in enumerate(model.sizes):
        x = model.scale_tokens(cond_vec, state, k).to(dtype)
        if cache is not None:
            outputs = model.scale_outputs(x, k, cond_vec, cache)
        else:
            inputs.append(x)
            outputs = model.outputs_upto(torch.cat(inputs, 1), cond_vec)[:, -size:]
        units.append(emit(outputs, k, weights[k], guided, generator))
        state = model.add_scale(state, units[-1], k)
        if on_scale is not None:
            on_scale(k, state)
    return units


class ScaleWiseSampler:
    """Next-scale (VAR) sampling: all tokens of a scale at once, coarse to fine, with a KV cache.

    CFG weight of scale k is `schedule.weight(k / (K - 1))` (VAR: cfg_schedule=linear, rising
    from 1 to `cfg`), then temperature, top-k and top-p. `on_scale(k, f_hat)` receives the
    running latent after each scale (`model.preview` decodes it). Returns (B, sum pn^2) code ids.
    `use_cache=False` recomputes every coarser scale each step (the reference path).
    """

    def __init__(self, settings: SamplingConfig, use_cache: bool = True, on_scale: ScaleCallback | None = None):
        self.settings = settings
        self.schedule = GuidanceSchedule.from_config(settings)
        self.use_cache = use_cache
        self.on_scale = on_scale

    @torch.no_grad()
    def __call__(self, model: ScaleWiseGenerator, cond: Condition) -> torch.Tensor:
        batch = condition_size(cond)

        def emit(logits: torch.Tensor, k: int, weight: float, guided: bool, generator: torch.Generator):
            noise = exponential_noise((batch, logits.shape[1], logits.shape[2]), generator, logits.device)
            return draw(logits, weight, noise, guided, self.settings)

        units = run_scales(model, cond, self.schedule, emit, self.use_cache, self.on_scale, self.settings.seed)
        return torch.cat(units, 1)
