"""KV-cached (and uncached reference) sampling loops: next-token (unit by unit) and next-scale
(scale by scale)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map

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
    as static addresses so the graph may update them in place. `kv_bucket=0` (default) attends
    over the whole static cache (one graph; on CUDA the causal decode kernel reads only the slots
    written so far, see nn/decode_attention.py); `kv_bucket=b` slices the cache to the first
    multiple of `b` slots past the current position (less memory read by dense kernels, one graph
    per bucket). The same function runs eagerly otherwise, so compiled and eager sampling draw
    the same tokens up to numerics.
    """

    def __init__(self, settings: SamplingConfig, use_cache: bool = True, on_unit: UnitCallback | None = None,
                 compile: bool = False, kv_bucket: int = 0):
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
            fn = compile_step(step, cache) if self.compile else step
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


def compile_step(step: Callable[..., Any], cache=None, graphs: int = 1) -> Callable[..., Any]:
    """`step` compiled for CUDA-graph replay: the cache (if any) is a static address updated in
    place, each call starts a new cudagraph step, and the outputs are cloned out of the graph's
    memory pool. `graphs`: how many specialisations (e.g. one per scale) the step may compile."""
    for buffer in cache.buffers() if cache is not None else ():
        torch._dynamo.mark_static_address(buffer)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    limit = max(torch._dynamo.config.recompile_limit, graphs)

    def run(*args) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=limit):
            out = compiled(*args)
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
    return run


ScaleCallback = Callable[[int, torch.Tensor], None]
ScaleStep = Callable[[int, torch.Tensor, "torch.Tensor | None", torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ScaleLoopSampler:
    """Base of next-scale samplers: the coarse-to-fine loop, returning the units of every scale.

    For each scale k: build its inputs from the state, run the trunk (with the KV cache, or
    uncached over all scales so far), turn the outputs into units with `emit` (its random draws
    made beforehand by `noise`, outside any compiled code) and fold them into the state. The CFG
    weight of scale k is `schedule.weight(k / (K - 1))`; when any weight differs from 1 the
    condition runs as a doubled batch (conditional rows first). `on_scale(k, state)` sees each
    new state.

    Each scale's whole step (inputs, cached trunk pass, `emit`, state update) can run as one CUDA
    graph per scale, so a small batch is not bound by kernel launches: `cuda_graph=True` captures
    the eager kernels on first use (a second or so), `compile=True` (CUDA) compiles the step with
    torch.compile (fused kernels, CUDA-graph replay; minutes of compilation per batch size). The
    cache and step are kept for the next call with the same model, batch and dtype (every slot
    a scale reads is written earlier in the same call).
    """

    def __init__(self, settings: SamplingConfig, use_cache: bool = True, on_scale: ScaleCallback | None = None,
                 compile: bool = False, cuda_graph: bool = False):
        if (compile or cuda_graph) and not use_cache:
            raise ValueError("compile=True and cuda_graph=True need use_cache=True (they replay the cached step)")
        if compile and cuda_graph:
            raise ValueError("choose one of compile=True (torch.compile, with CUDA graphs) and cuda_graph=True")
        self.settings = settings
        self.schedule = GuidanceSchedule.from_config(settings)
        self.use_cache = use_cache
        self.on_scale = on_scale
        self.compile = compile
        self.cuda_graph = cuda_graph
        self._steps: dict[tuple, ScaleStep] = {}

    def noise(self, model: ScaleWiseGenerator, k: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The random draws `emit` needs for scale k."""
        raise NotImplementedError

    def emit(self, model: ScaleWiseGenerator, outputs: torch.Tensor, k: int, weight: float, guided: bool,
             noise: torch.Tensor) -> torch.Tensor:
        """Scale k's units (B, pn_k^2, ...) from the trunk's outputs for it."""
        raise NotImplementedError

    def run(self, model: ScaleWiseGenerator, cond: Condition) -> list[torch.Tensor]:
        """The units of every scale, coarse to fine."""
        device = next(model.parameters()).device
        n = len(model.scales)
        weights = [self.schedule.weight(k / max(n - 1, 1)) for k in range(n)]
        guided = model.has_condition and any(w != 1.0 for w in weights)
        dtype = next(model.trunk.parameters()).dtype
        batch = condition_size(cond)
        cond_vec = doubled_condition(model, cond, guided, model.condition_vector).to(dtype)
        step = self._cached_step(model, cond_vec.shape[0], dtype, device, guided, weights) if self.use_cache else None
        generator = torch.Generator(device).manual_seed(self.settings.seed)
        state, inputs, units = None, [], []
        for k, size in enumerate(model.sizes):
            noise = self.noise(model, k, batch, generator)
            if step is not None:
                new, state = step(k, cond_vec, state, noise)
            else:
                inputs.append(model.scale_tokens(cond_vec, state, k).to(dtype))
                outputs = model.outputs_upto(torch.cat(inputs, 1), cond_vec)[:, -size:]
                new = self.emit(model, outputs, k, weights[k], guided, noise)
                state = model.add_scale(state, new, k)
            units.append(new)
            if self.on_scale is not None:
                self.on_scale(k, state)
        return units

    def _cached_step(self, model: ScaleWiseGenerator, rows: int, dtype: torch.dtype, device: torch.device,
                     guided: bool, weights: list[float]) -> ScaleStep:
        """One scale's KV-cached step (compiled when asked), kept for calls with the same key."""
        key = (id(model), rows, dtype, guided, tuple(weights))
        if key not in self._steps:
            cache = model.new_cache(rows, dtype, device)

            def step(k: int, cond_vec: torch.Tensor, state: torch.Tensor | None, noise: torch.Tensor):
                x = model.scale_tokens(cond_vec, state, k).to(dtype)
                new = self.emit(model, model.scale_outputs(x, k, cond_vec, cache), k, weights[k], guided, noise)
                return new, model.add_scale(state, new, k)
            if self.compile:
                step = compile_step(step, cache, graphs=len(weights) + 1)
            elif self.cuda_graph:
                step = ScaleGraphs(step)
            self._steps = {key: step}
        return self._steps[key]


class ScaleGraphs:
    """A scale step replayed from one CUDA graph per scale, captured from its eager kernels on first use.

    Inputs are copied into the graph's static tensors before each replay and outputs are cloned
    out after it; the KV cache is written in place by the graph. All graphs share one memory pool
    (they never run at the same time).
    """

    def __init__(self, step: ScaleStep):
        self.step = step
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    def __call__(self, k: int, cond_vec: torch.Tensor, state: torch.Tensor | None,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k not in self.graphs:
            self.graphs[k] = self._capture(k, cond_vec, state, noise)
        graph, inputs, outputs = self.graphs[k]
        for static, value in zip(inputs, (cond_vec, state, noise)):
            if static is not None:
                static.copy_(value)
        graph.replay()
        return outputs[0].clone(), outputs[1].clone()

    def _capture(self, k: int, *args: torch.Tensor | None) -> tuple:
        inputs = tuple(None if t is None else t.clone() for t in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
            self.step(k, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step(k, *inputs)
        return graph, inputs, outputs


class ScaleWiseSampler(ScaleLoopSampler):
    """Next-scale (VAR) sampling: all tokens of a scale at once, coarse to fine, with a KV cache.

    CFG weight of scale k is `schedule.weight(k / (K - 1))` (VAR: cfg_schedule=linear, rising
    from 1 to `cfg`), then temperature, top-k and top-p. `on_scale(k, f_hat)` receives the
    running latent after each scale (`model.preview` decodes it). Returns (B, sum pn^2) code ids.
    `use_cache=False` recomputes every coarser scale each step (the reference path); `compile`
    as in `ScaleLoopSampler`.
    """

    def noise(self, model: ScaleWiseGenerator, k: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        return exponential_noise((batch, model.sizes[k], model.vocab_size), generator, generator.device)

    def emit(self, model: ScaleWiseGenerator, outputs: torch.Tensor, k: int, weight: float, guided: bool,
             noise: torch.Tensor) -> torch.Tensor:
        return draw(outputs, weight, noise, guided, self.settings)

    @torch.no_grad()
    def __call__(self, model: ScaleWiseGenerator, cond: Condition) -> torch.Tensor:
        return torch.cat(self.run(model, cond), 1)
