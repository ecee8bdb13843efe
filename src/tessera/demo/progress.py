"""Progressive previews while any generator samples, through the sampler's own per-step hook.

A preview is the partial result decoded as a picture: next-token models show the rows done so
far (the rest as token 0), MaskGIT the current tokens (masked ones as token 0), next-scale models
the running coarse-to-fine reconstruction. Audio models report progress without pictures.
`stream_sample` runs sampling in a worker thread and yields each step as it comes.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..generators.base import Condition, Generator
from ..sample import sample_once
from ..samplers.autoregressive import AutoregressiveSampler, ScaleLoopSampler
from ..samplers.masked import MaskedSampler, StreamMaskedSampler

MAX_PREVIEWS = 16  # next-token models without a square unit grid: at most this many previews


@dataclass(frozen=True)
class Progress:
    """Step `done` of `total` (`what`: "row", "scale" or "step"); `image` (B, 3, H, W) in [-1, 1]
    when the model makes pictures."""

    what: str
    done: int
    total: int
    image: torch.Tensor | None


@dataclass(frozen=True)
class Finished:
    """The sampled output (images (B, 3, H, W) or waveforms (B, 1, T), on the CPU) and its wall time."""

    output: torch.Tensor
    seconds: float


class Cancelled(Exception):
    """Raised inside the sampler's hook to stop a generation nobody waits for any more."""


def attach_progress(model: Generator, sampler: object, report: Callable[[Progress], None]) -> None:
    """Make `sampler` call `report` after every step of `model`: each row of units (next-token),
    scale (next-scale) or masked step."""
    pictures = model.modality == "image"
    if isinstance(sampler, AutoregressiveSampler):
        n = model.n_units
        side = math.isqrt(n)
        stride = side if side * side == n else math.ceil(n / MAX_PREVIEWS)  # units per row
        rows = math.ceil(n / stride)

        def on_unit(j: int, units: torch.Tensor) -> None:
            if (j + 1) % stride and j + 1 < n:
                return
            row = math.ceil((j + 1) / stride)
            if not pictures:
                return report(Progress("row", row, rows, None))
            full = torch.zeros(units.shape[0], n, *units.shape[2:], dtype=units.dtype, device=units.device)
            full[:, : j + 1] = units  # units not drawn yet stay token 0
            report(Progress("row", row, rows, model.decode_units(full)))
        sampler.on_unit = on_unit
    elif isinstance(sampler, ScaleLoopSampler):
        total = len(model.scales)
        sampler.on_scale = lambda k, state: report(
            Progress("scale", k + 1, total, model.preview(state) if pictures else None))
    elif isinstance(sampler, StreamMaskedSampler):
        total = sum(sampler.masked.stage_steps[: model.num_streams])
        count = itertools.count(1)
        sampler.on_step = lambda k, codes: report(Progress("step", next(count), total, None))
    elif isinstance(sampler, MaskedSampler):
        total = sampler.masked.steps
        sampler.on_step = lambda t, tokens: report(Progress("step", t + 1, total, model.decode_units(
            tokens.masked_fill(tokens == model.mask_id, 0)) if pictures else None))  # masked ones as token 0


def stream_sample(model: Generator, cond: Condition, sampler: object, duration: float | None = None,
                  model_lock: threading.Lock | None = None) -> Iterator[Progress | Finished]:
    """Sample in a worker thread; yield a `Progress` per step, then one `Finished`. An error in
    sampling is raised here; closing the iterator early stops the worker at its next step.
    `duration`: seconds of audio (audio models), set on the model while the worker holds `model_lock`,
    so concurrent requests for one model never see each other's duration."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def report(progress: Progress) -> None:
        if stop.is_set():
            raise Cancelled
        events.put(progress)

    def work() -> None:
        start = time.perf_counter()
        try:
            with model_lock or contextlib.nullcontext():
                if duration is not None:
                    model.set_duration(duration)
                output = sample_once(model, cond, sampler)
            events.put(Finished(output, time.perf_counter() - start))
        except Cancelled:
            pass
        except Exception as err:  # handed to the caller's thread and raised there
            events.put(err)

    attach_progress(model, sampler, report)
    threading.Thread(target=work, name="tessera-sample", daemon=True).start()
    try:
        while True:
            event = events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Finished):
                return
    finally:
        stop.set()
