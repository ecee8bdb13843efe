"""Load a checkpoint and sample images with the shared sampler API (CLI, eval and demo use this)."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .generators.base import AutoregressiveGenerator, Generator, ScaleWiseGenerator
from .images import save_grid
from .modeling import TesseraModel
from .samplers.autoregressive import AutoregressiveSampler, ScaleWiseSampler
from .samplers.flow import FlowSamplingConfig, FlowScaleSampler
from .samplers.logits import SamplingConfig


def load_generator(ckpt: str | Path, use_ema: bool = True, device: str | None = None) -> Generator:
    """Any registered generator from a checkpoint or run folder, in eval mode on `device`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TesseraModel.from_pretrained(ckpt, ema=use_ema, map_location=device)
    if not isinstance(model, Generator):
        raise CheckpointError(f"{ckpt} holds a '{model.kind}' model, which does not generate; give a generator checkpoint")
    return model.eval()


def sampler_for(model: Generator, settings: SamplingConfig, on_scale=None, flow: FlowSamplingConfig | None = None):
    """The sampler that drives this kind of generator (`on_scale`: scale-wise models' hook; `flow`:
    the ODE settings of flow-head models)."""
    if isinstance(model, AutoregressiveGenerator):
        return AutoregressiveSampler(settings)
    if model.kind == "next_scale":
        return ScaleWiseSampler(settings, on_scale=on_scale)
    if model.kind == "flow_ar":
        return FlowScaleSampler(settings, flow, on_scale=on_scale)
    raise CheckpointError(f"no sampler for generator kind '{model.kind}'")


@torch.no_grad()
def generate(model: Generator, values: list[str] | None, n: int, settings: SamplingConfig,
             batch_size: int = 64, flow: FlowSamplingConfig | None = None) -> torch.Tensor:
    """n images (n, 3, H, W) in [-1, 1]; batches get consecutive seeds from settings.seed."""
    cond = model.parse_condition(values, n)
    chunks = []
    for i, start in enumerate(range(0, n, batch_size)):
        part = cond[start:start + batch_size] if not isinstance(cond, int) else min(batch_size, n - start)
        sampler = sampler_for(model, settings.replace(seed=settings.seed + i), flow=flow)
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            chunks.append(model.sample(part, sampler).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def coarse_to_fine(model: ScaleWiseGenerator, values: list[str] | None, n: int, settings: SamplingConfig,
                   flow: FlowSamplingConfig | None = None) -> torch.Tensor:
    """(n * K, 3, H, W): for each of n samples, the decoded running reconstruction after every scale."""
    steps: list[torch.Tensor] = []
    sampler = sampler_for(model, settings, on_scale=lambda k, state: steps.append(model.preview(state)), flow=flow)
    model.sample(model.parse_condition(values, n), sampler)
    return torch.stack(steps, 1).flatten(0, 1).float().cpu()


def generate_to_file(ckpt: str | Path, values: list[str] | None, n: int, settings: SamplingConfig, out: str | Path,
                     use_ema: bool = True, device: str | None = None, batch_size: int = 64,
                     save_scales: str | Path | None = None, flow: FlowSamplingConfig | None = None) -> Path:
    """Write a grid of n samples to `out`; with `save_scales`, also a coarse-to-fine strip (one row
    per sample, up to 8, one column per scale) of a next-scale model."""
    model = load_generator(ckpt, use_ema=use_ema, device=device)
    if save_scales is not None:
        if not isinstance(model, ScaleWiseGenerator):
            raise ConfigError(f"--save-scales needs a next-scale model; {ckpt} holds a '{model.kind}' model")
        save_grid(coarse_to_fine(model, values, min(n, 8), settings, flow), save_scales, nrow=len(model.scales))
    return save_grid(generate(model, values, n, settings, batch_size, flow), out)
