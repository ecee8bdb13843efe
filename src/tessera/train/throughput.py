"""Throughput accounting: samples/s, tokens/s, model FLOPs utilisation (MFU) and peak memory.

Model FLOPs are counted analytically from a generator's configuration at its training sequence
length: trunk (QKV and output projections, SwiGLU MLP, AdaLN, attention) plus output heads and
the small trainable projections around the trunk (Token-Shuffle MLPs, scale input projections).
Training is forward + backward = 3x forward (the PaLM / nanoGPT convention; activation
recomputation is not counted). Attention counts the full L x L score matrix (QK^T and the
weighted sum, 2 * 2 * L^2 * dim per layer) even where the mask hides blocks (causal,
block-causal, band), as the "model FLOPs" convention does. Not counted: the frozen tokenizer
(forward only, under no_grad), embedding lookups, norms, activations, softmax and losses.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..generators.masking import mask_ratio
from ..nn.layers import swiglu_hidden
from ..nn.trunk import TrunkConfig

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per GPU, from NVIDIA's datasheets; keys are
# substrings of torch.cuda.get_device_name (the longest matching key wins). GeForce cards: FP32 accumulate.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H100": 989.0,  # SXM5 / HBM3
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "H200": 989.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX A6000": 154.8,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}
PEAK_ENV = "TESSERA_PEAK_TFLOPS"


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, GPU name) of `device`; `TESSERA_PEAK_TFLOPS` overrides the table.
    The peak is None on a CPU (name "cpu") or on a GPU the table does not know."""
    if device.type != "cuda":
        return None, device.type
    name = torch.cuda.get_device_name(device)
    if os.environ.get(PEAK_ENV):
        try:
            return float(os.environ[PEAK_ENV]) * 1e12, name
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r} is not a number of TFLOP/s") from None
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in name.lower()]
    if not matches:
        return None, name
    return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12, name


def trunk_flops(cfg: TrunkConfig, length: int) -> float:
    """Forward FLOPs of one sample through the trunk at `length` positions (dense attention)."""
    d, hidden = cfg.dim, swiglu_hidden(cfg.dim, cfg.mlp_ratio, cfg.multiple_of)
    per_layer = 2 * length * (4 * d * d + 3 * d * hidden) + 4 * length * length * d
    if cfg.cond_dim:  # AdaLN: one (cond_dim -> 6 dim) map per sample and layer, (-> 2 dim) at the end
        per_layer += 12 * cfg.cond_dim * d
        return cfg.n_layers * per_layer + 4 * cfg.cond_dim * d
    return cfg.n_layers * per_layer


def per_row_flops(module: nn.Module) -> float:
    """Forward FLOPs of all of `module`'s linear layers applied to one row."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _next_token(model: nn.Module) -> tuple[int, float]:
    n, s2 = model.n_units, model.unit_size
    extra = n * s2 * per_row_flops(model.head)  # logits of units 0..n-1, s^2 tokens each
    if model.shuffle is not None:
        sh = model.shuffle
        extra += (n - 1) * (s2 * per_row_flops(sh.compress) + per_row_flops(sh.merge_mlps))
        extra += n * (per_row_flops(sh.unmerge_mlps) + s2 * per_row_flops(sh.expand))
    return model.prefix_length + n - 1, extra


def _next_token_streams(model: nn.Module) -> tuple[int, float]:
    from ..generators import patterns
    steps = patterns.steps(model.pattern, model.num_codebooks, model.max_frames)  # a full training crop
    return model.prefix_length + steps - 1, steps * per_row_flops(model.heads)  # every head at every step


def _scale_sequence(model: nn.Module) -> tuple[int, float]:
    inputs = model.seq_len - model.sizes[0]  # scale 0 is start tokens, not projected
    return model.seq_len, inputs * per_row_flops(model.input_proj) + model.seq_len * per_row_flops(model.head)


def expected_masked_fraction(model: nn.Module) -> float:
    """Mean training mask ratio of a masked generator's schedule (cosine: 2 / pi): its heads run
    on the masked positions only."""
    return float(mask_ratio(model.config.mask_schedule, torch.linspace(0.0, 1.0, 10001)).mean())


def _maskgit(model: nn.Module) -> tuple[int, float]:
    rows = model.n_tokens * expected_masked_fraction(model)
    return model.prefix.length + model.n_tokens, rows * per_row_flops(model.head)


def _magnet(model: nn.Module) -> tuple[int, float]:
    frames = model.max_frames  # one stream's head per training step, on its masked frames
    return model.prefix.length + frames, frames * expected_masked_fraction(model) * per_row_flops(model.heads[0])


# kind -> (trunk sequence length, forward FLOPs of one sample outside the trunk)
_LAYOUTS = {"next_token": _next_token, "next_token_streams": _next_token_streams, "next_scale": _scale_sequence,
            "flow_ar": _scale_sequence, "maskgit": _maskgit, "magnet": _magnet}


def training_sequence_length(model: nn.Module) -> int:
    """Positions the trunk sees per training sample (condition prefix + token positions)."""
    return _layout(model)[0]


def training_flops_per_sample(model: nn.Module) -> float:
    """Model FLOPs of one training sample: 3x the forward FLOPs of trunk and heads (see module doc)."""
    length, extra = _layout(model)
    return 3.0 * (trunk_flops(model.trunk.config, length) + extra)


def _layout(model: nn.Module) -> tuple[int, float]:
    kind = getattr(model, "kind", type(model).__name__)
    if kind not in _LAYOUTS:
        raise ValueError(f"cannot count the training FLOPs of a {kind!r} model; "
                         f"counted kinds: {', '.join(_LAYOUTS)}")
    return _LAYOUTS[kind](model)


class ThroughputMeter:
    """Samples/s, tokens/s, achieved TFLOP/s per GPU, MFU and peak memory over a logging window.

    On a GPU the window is timed by CUDA events around its queued work, so closing it does not make
    the host wait for the GPU: `close_window()` returns the window, whose rates are read later."""

    def __init__(self, flops_per_sample: float, peak_flops: float | None, num_processes: int = 1,
                 tokens_per_sample: int | None = None, device: torch.device | None = None):
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.num_processes, self.tokens_per_sample = num_processes, tokens_per_sample
        self.cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.samples = 0
        self.start = time.perf_counter()
        self.start_event = _recorded_event() if self.cuda else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def update(self, samples: int) -> None:
        """Count `samples` trained on this process."""
        self.samples += samples

    def close_window(self) -> "MeteredWindow":
        """End the window at the work queued so far and start a new one; its rates are read later."""
        window = MeteredWindow(self, self.samples, self.start, time.perf_counter(), self.start_event,
                               _recorded_event() if self.cuda else None,
                               torch.cuda.max_memory_allocated(self.device) if self.cuda else None)
        self._reset()
        return window


def _recorded_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class MeteredWindow:
    """One closed window of a ThroughputMeter; `rates()` waits for its GPU work to end."""

    def __init__(self, meter: ThroughputMeter, samples: int, start: float, end: float,
                 start_event: torch.cuda.Event | None, end_event: torch.cuda.Event | None, peak_bytes: int | None):
        self.meter, self.samples, self.start, self.end = meter, samples, start, end
        self.start_event, self.end_event, self.peak_bytes = start_event, end_event, peak_bytes

    def seconds(self) -> float:
        """The window's length: GPU time between its events on a GPU, host time otherwise."""
        if self.end_event is not None:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event) / 1e3
        return self.end - self.start

    def rates(self) -> dict[str, float]:
        """Samples/s and tokens/s over all processes, TFLOP/s and MFU per GPU, peak memory in GB
        (1e9 bytes) on this GPU."""
        meter = self.meter
        local = self.samples / max(self.seconds(), 1e-9)
        achieved = local * meter.flops_per_sample
        out = {"samples_per_s": local * meter.num_processes}
        if meter.flops_per_sample:
            out["tflops_per_s"] = achieved / 1e12
        if meter.tokens_per_sample:
            out["tokens_per_s"] = out["samples_per_s"] * meter.tokens_per_sample
        if meter.peak_flops and meter.flops_per_sample:
            out["mfu"] = achieved / meter.peak_flops
        if self.peak_bytes is not None:
            out["peak_mem_gb"] = self.peak_bytes / 1e9
        return out
