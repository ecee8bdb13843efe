"""Load a checkpoint and sample images or audio with the shared sampler API (CLI, eval and demo use this)."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .generators.base import AutoregressiveGenerator, Generator, ScaleWiseGenerator
from .audio_io import save_wavs
from .images import save_grid
from .modeling import TesseraModel
from .samplers.autoregressive import AutoregressiveSampler, ScaleWiseSampler
from .samplers.flow import FlowSamplingConfig, FlowScaleSampler
from .samplers.logits import SamplingConfig
from .samplers.masked import ARRescorer, HybridSampler, MaskedSampler, MaskedSamplingConfig, StreamMaskedSampler

# Per-kind sampling defaults, under any value the user gives (audiocraft MAGNeT's decoding).
SAMPLING_DEFAULTS = {"magnet": {"temperature": 3.0, "top_p": 0.9, "cfg": 10.0, "cfg_schedule": "decreasing"}}
DEFAULT_RESCORE_WEIGHT = 0.3  # with --rescore-ckpt and no --masked-rescore-weight


def load_companion_ar(model: Generator, path: str | Path, device: str | None) -> Generator:
    """A multi-stream next-token model on the same codec as `model` (for rescoring or hybrid decoding)."""
    ar = load_generator(path, device=device)
    if ar.kind != "next_token_streams":
        raise ConfigError(f"{path} holds a '{ar.kind}' model; rescoring and hybrid decoding need a "
                          "'next_token_streams' model on the same audio codec")
    if ar.tokenizer.config != model.tokenizer.config or ar.num_codebooks != model.num_streams:
        raise ConfigError(f"{path} uses another audio codec (or number of streams) than the '{model.kind}' model")
    return ar


def resolve_settings(model: Generator, given: dict, masked_given: dict | None = None
                     ) -> tuple[SamplingConfig, MaskedSamplingConfig]:
    """Sampling configs from the values a user gave, over the checkpoint's recommended settings
    (`tessera export --sampling`), over the generator kind's defaults."""
    recommended = model.recommended_sampling
    settings = SamplingConfig.from_dict({**SAMPLING_DEFAULTS.get(model.kind, {}), **recommended.get("sampling", {}),
                                         **given})
    base = MaskedSamplingConfig.magnet() if model.kind == "magnet" else MaskedSamplingConfig()
    return settings, MaskedSamplingConfig.from_dict({**base.to_dict(), **recommended.get("masked", {}),
                                                     **(masked_given or {})})


def load_generator(ckpt: str | Path, use_ema: bool = True, device: str | None = None) -> Generator:
    """Any registered generator from a checkpoint or run folder, in eval mode on `device`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TesseraModel.from_pretrained(ckpt, ema=use_ema, map_location=device)
    if not isinstance(model, Generator):
        raise CheckpointError(f"{ckpt} holds a '{model.kind}' model, which does not generate; give a generator checkpoint")
    return model.eval()


def sampler_for(model: Generator, settings: SamplingConfig, on_scale=None, flow: FlowSamplingConfig | None = None,
                masked: MaskedSamplingConfig | None = None, ar: Generator | None = None,
                hybrid_seconds: float | None = None):
    """The sampler that drives this kind of generator (`on_scale`: scale-wise models' hook; `flow`:
    the ODE settings of flow-head models; `masked`: masked models' decoding; `ar`: MAGNeT's
    companion autoregressive model, for rescoring and for the first `hybrid_seconds`)."""
    if isinstance(model, AutoregressiveGenerator):
        return AutoregressiveSampler(settings)
    if model.kind == "maskgit":
        return MaskedSampler(settings, masked)
    if model.kind == "magnet":
        rescorer = ARRescorer(ar, model.mask_id) if ar is not None and masked and masked.rescore_weight > 0 else None
        sampler = StreamMaskedSampler(settings, masked, rescorer=rescorer)
        if hybrid_seconds:
            if ar is None:
                raise ConfigError("hybrid decoding needs an autoregressive model: give --rescore-ckpt")
            return HybridSampler(sampler, ar, AutoregressiveSampler(settings), hybrid_seconds)
        return sampler
    if model.kind == "next_scale":
        return ScaleWiseSampler(settings, on_scale=on_scale)
    if model.kind == "flow_ar":
        return FlowScaleSampler(settings, flow, on_scale=on_scale)
    raise CheckpointError(f"no sampler for generator kind '{model.kind}'")


@torch.no_grad()
def generate(model: Generator, values: list[str] | None, n: int, settings: SamplingConfig,
             batch_size: int = 64, flow: FlowSamplingConfig | None = None,
             masked: MaskedSamplingConfig | None = None, ar: Generator | None = None,
             hybrid_seconds: float | None = None) -> torch.Tensor:
    """n outputs: images (n, 3, H, W) or waveforms (n, 1, T) in [-1, 1]; batches get consecutive
    seeds from settings.seed."""
    cond = model.parse_condition(values, n)
    chunks = []
    for i, start in enumerate(range(0, n, batch_size)):
        part = cond[start:start + batch_size] if not isinstance(cond, int) else min(batch_size, n - start)
        sampler = sampler_for(model, settings.replace(seed=settings.seed + i), flow=flow, masked=masked, ar=ar,
                              hybrid_seconds=hybrid_seconds)
        chunks.append(sample_once(model, part, sampler))
    return torch.cat(chunks)


@torch.no_grad()
def sample_once(model: Generator, cond, sampler) -> torch.Tensor:
    """One batch from `sampler`, in bf16 autocast on CUDA (float32 elsewhere), as float32 on the CPU."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        return model.sample(cond, sampler).float().cpu()


@torch.no_grad()
def coarse_to_fine(model: ScaleWiseGenerator, values: list[str] | None, n: int, settings: SamplingConfig,
                   flow: FlowSamplingConfig | None = None) -> torch.Tensor:
    """(n * K, 3, H, W): for each of n samples, the decoded running reconstruction after every scale."""
    steps: list[torch.Tensor] = []
    sampler = sampler_for(model, settings, on_scale=lambda k, state: steps.append(model.preview(state)), flow=flow)
    model.sample(model.parse_condition(values, n), sampler)
    return torch.stack(steps, 1).flatten(0, 1).float().cpu()


def generate_to_file(ckpt: str | Path, values: list[str] | None, n: int, given: dict, out: str | Path,
                     use_ema: bool = True, device: str | None = None, batch_size: int = 64,
                     save_scales: str | Path | None = None, flow: FlowSamplingConfig | None = None,
                     masked_given: dict | None = None, duration: float | None = None,
                     rescore_ckpt: str | Path | None = None, hybrid_seconds: float | None = None) -> list[Path]:
    """Write n samples: a PNG grid at `out` for images, WAV files for audio (`out` for one sample,
    `<stem>-<i>.wav` for several). `given`/`masked_given`: the sampling values the user set (over
    the kind's defaults). `save_scales`: also a coarse-to-fine strip (one row per sample, up to 8,
    one column per scale) of a next-scale model. `duration`: seconds of audio (audio models).
    `rescore_ckpt`, `hybrid_seconds`: MAGNeT's rescoring model and autoregressive head start."""
    model = load_generator(ckpt, use_ema=use_ema, device=device)
    masked_given = dict(masked_given or {})
    ar = None
    if rescore_ckpt is not None or hybrid_seconds:
        if model.kind != "magnet":
            raise ConfigError(f"--rescore-ckpt and --hybrid-seconds are for MAGNeT; {ckpt} holds a '{model.kind}' model")
        if rescore_ckpt is None:
            raise ConfigError("--hybrid-seconds needs --rescore-ckpt: the autoregressive model that starts the clip")
        ar = load_companion_ar(model, rescore_ckpt, device)
        masked_given.setdefault("rescore_weight", DEFAULT_RESCORE_WEIGHT)
    settings, masked = resolve_settings(model, given, masked_given)
    audio = model.modality == "audio"
    if duration is not None:
        if not audio:
            raise ConfigError(f"--duration is for audio models; {ckpt} holds a '{model.kind}' image model")
        model.set_duration(duration)
    if audio:
        outputs = generate(model, values, n, settings, batch_size, flow, masked, ar, hybrid_seconds)
        return save_wavs(outputs, out, model.sample_rate)
    if save_scales is not None:
        if not isinstance(model, ScaleWiseGenerator):
            raise ConfigError(f"--save-scales needs a next-scale model; {ckpt} holds a '{model.kind}' model")
        save_grid(coarse_to_fine(model, values, min(n, 8), settings, flow), save_scales, nrow=len(model.scales))
    return [save_grid(generate(model, values, n, settings, batch_size, flow, masked), out)]
