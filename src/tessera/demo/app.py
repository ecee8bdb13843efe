"""The Gradio demo (`tessera demo`): pick a generator, prompt it, watch it generate.

One page over every generator: prompt or class, CFG, temperature, top-k/top-p, steps, seed and
(audio models) duration;
previews streamed while sampling (see `progress.py`), audio output for audio models, a gallery of
the session's recent results and the time each generation took. Generations go through Gradio's
queue with a concurrency limit; bad inputs come back as one clear message in the page. Besides
`/generate`, the API has `/stats`: generations running now, the most at once, served, rejected
and failed.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import gradio as gr
import numpy as np
import torch

from ..assets import SHIPPED_MODELS, shipped_models
from ..checkpoint import CheckpointError
from ..config import ConfigError, check_range
from ..generators.base import Condition, Generator
from ..images import to_uint8
from ..sample import load_generator, resolve_settings, sampler_for
from ..samplers.logits import SamplingConfig
from ..samplers.masked import MaskedSamplingConfig
from .progress import Finished, stream_sample

MAX_STEPS = 100  # masked decoding steps a request may ask for
GALLERY_SIZE = 12  # recent results kept per session
MASKED_KINDS = ("maskgit", "magnet")
# Small images fill the result box and stay sharp when scaled up.
CSS = ("#result img { width: 100%; height: 100%; object-fit: contain; }\n"
       "#result img, #gallery img { image-rendering: pixelated; }")


@dataclass(frozen=True)
class DemoModel:
    """A loaded generator and what the page says about it."""

    name: str
    generator: Generator
    title: str
    example: str  # an example prompt ("" when none is known)


def demo_models(ckpts: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Each `ckpts` folder under its own name (repeated names get -2, -3, ...), then the shipped
    default models present in this installation."""
    models: dict[str, Path] = {}
    for name, path in [(Path(c).resolve().name, Path(c)) for c in ckpts] + \
            [(name, model.path) for name, model in shipped_models().items()]:
        unique, i = name, 2
        while unique in models:
            unique, i = f"{name}-{i}", i + 1
        models[unique] = path
    return models


def load_models(models: dict[str, Path], device: str | None) -> dict[str, DemoModel]:
    """Load every generator; shipped ones keep their title and example prompt."""
    shipped = {model.path.resolve(): model for model in SHIPPED_MODELS.values()}
    loaded = {}
    for name, path in models.items():
        known = shipped.get(Path(path).resolve())
        loaded[name] = DemoModel(name, load_generator(path, device=device),
                                 known.title if known else str(path), known.example_prompt if known else "")
    return loaded


class InFlight:
    """Counts generations: running now, the most ever running at once, served, rejected (bad
    input) and failed."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self.running = self.peak = self.served = self.rejected = self.failed = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            yield
            with self._lock:
                self.served += 1
        except gr.Error:
            with self._lock:
                self.rejected += 1
            raise
        except Exception:
            with self._lock:
                self.failed += 1
            raise
        finally:
            with self._lock:
                self.running -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"running": self.running, "peak_running": self.peak, "served": self.served,
                    "rejected": self.rejected, "failed": self.failed, "concurrency_limit": self.limit}


def _classes(g: Generator) -> str:
    return ", ".join(g.config.class_names) or f"0 to {g.config.num_classes - 1}"


def describe(entry: DemoModel) -> str:
    """One Markdown line on what the model makes and what it is conditioned on."""
    g = entry.generator
    made = f"audio, {g.clip_seconds:g} s at {g.sample_rate} Hz" if g.modality == "audio" else "images"
    cond = {"class": f"class ({_classes(g)})", "none": "unconditional"}.get(g.config.cond, g.config.cond)
    return f"**{entry.name}**: {entry.title} · `{g.kind}` · {made} · conditioned on {cond}"


def model_defaults(g: Generator) -> tuple[SamplingConfig, int]:
    """The sampling settings and steps the page offers first: `tessera sample`'s defaults for this
    model (its recommended settings, over its kind's); MAGNeT's steps are its first stream's."""
    settings, masked = resolve_settings(g, {})
    return settings, masked.stage_steps[0] if g.kind == "magnet" else masked.steps


def masked_steps(g: Generator, steps: int) -> dict[str, Any]:
    """MaskedSamplingConfig values for `steps`: MaskGIT's steps, or MAGNeT's default steps per
    stream scaled so that the first stream gets `steps` (20,10,10,10 -> 4,2,2,2 for 4)."""
    if g.kind == "magnet":
        default = resolve_settings(g, {})[1].stage_steps
        return {"stage_steps": [max(1, round(n * steps / default[0])) for n in default]}
    return {"steps": steps}


def read_request(entry: DemoModel, prompt: str | None, cfg: float | None, temperature: float | None,
                 top_k: int | None, top_p: float | None, steps: int | None, seed: int | None,
                 duration: float | None = None) -> tuple[Condition, SamplingConfig, MaskedSamplingConfig]:
    """The condition and sampling configs of one request; ConfigError names any bad value
    (`duration`: seconds of audio, checked against an audio model's trained clip length)."""
    numbers = {"cfg": cfg, "temperature": temperature, "top_k": top_k, "top_p": top_p, "steps": steps, "seed": seed}
    for name, value in numbers.items():
        if value is None:
            raise ConfigError(f"{name} is empty: enter a number")
    check_range("steps", steps, 1, MAX_STEPS)
    g = entry.generator
    if g.modality == "audio":
        if duration is None:
            raise ConfigError("duration is empty: enter seconds of audio")
        check_range("duration", duration, 0.0, g.clip_seconds, low_open=True)
    prompt = (prompt or "").strip()
    if g.config.cond == "text" and not prompt:
        example = f' (e.g. "{entry.example}")' if entry.example else ""
        raise ConfigError(f"Enter a prompt: {entry.name} is text-conditional{example}")
    if g.config.cond == "class" and not prompt:
        raise ConfigError(f"Enter a class: {entry.name} is class-conditional (name or index: {_classes(g)})")
    given = {"cfg": cfg, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    settings, masked = resolve_settings(g, given, masked_steps(g, int(steps)) if g.kind in MASKED_KINDS else None)
    cond = g.parse_condition([prompt] if g.config.cond != "none" else None, 1)
    return cond, settings, masked


def _picture(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images[:1])[0]


def _sound(g: Generator, waves: torch.Tensor) -> tuple[int, np.ndarray]:
    return g.sample_rate, (waves[0].reshape(-1).clamp(-1, 1) * 32767).round().to(torch.int16).numpy()


def _prompt_box(entry: DemoModel) -> dict[str, Any]:
    g = entry.generator
    if g.config.cond == "text":
        return {"label": "Prompt", "placeholder": entry.example or "describe what to generate", "visible": True}
    if g.config.cond == "class":
        return {"label": "Class", "placeholder": f"name or index: {_classes(g)}", "visible": True}
    return {"label": "Prompt", "placeholder": "", "visible": False}


def model_view(entry: DemoModel) -> dict[str, dict[str, Any]]:
    """The properties of the model-dependent components (info, prompt, cfg, temperature, top_k,
    top_p, steps, duration, image, audio) for this model, in that order."""
    g = entry.generator
    settings, steps = model_defaults(g)
    audio = g.modality == "audio"
    return {"info": {"value": describe(entry)}, "prompt": _prompt_box(entry), "cfg": {"value": settings.cfg},
            "temperature": {"value": settings.temperature}, "top_k": {"value": settings.top_k},
            "top_p": {"value": settings.top_p},
            "steps": {"value": steps, "interactive": g.kind in MASKED_KINDS},
            "duration": {"value": g.clip_seconds if audio else None, "visible": audio},
            "image": {"visible": not audio}, "audio": {"visible": audio}}


def build_app(models: dict[str, Path], concurrency_limit: int = 2, device: str | None = None) -> gr.Blocks:
    """The demo page over `models` (name -> checkpoint folder), at most `concurrency_limit`
    generations at a time (more wait in the queue)."""
    if not models:
        raise CheckpointError("no generator to show: give --ckpt DIR (no default model is installed)")
    check_range("concurrency", concurrency_limit, 1)
    entries = load_models(models, device)
    stats = InFlight(concurrency_limit)
    locks = {name: threading.Lock() for name in entries}  # one sampling at a time per audio model (its duration)

    def generate(name: str, prompt: str, cfg: float, temperature: float, top_k: int, top_p: float, steps: int,
                 seed: int, duration: float | None, history: list) -> Iterator[tuple]:
        """Sample one output, streaming previews; yields (image, audio, gallery, history, status)."""
        with stats.track():
            try:
                entry = entries[name]
                cond, settings, masked = read_request(entry, prompt, cfg, temperature, top_k, top_p, steps, seed,
                                                      duration)
                sampler = sampler_for(entry.generator, settings, masked=masked)
            except (ConfigError, CheckpointError) as err:
                raise gr.Error(str(err), print_exception=False) from None
            g = entry.generator
            audio = g.modality == "audio"
            for event in stream_sample(g, cond, sampler, duration if audio else None, locks[name] if audio else None):
                if not isinstance(event, Finished):
                    image = _picture(event.image) if event.image is not None else gr.skip()
                    yield image, gr.skip(), gr.skip(), gr.skip(), f"{event.what} {event.done}/{event.total}"
                    continue
                status = f"generated in {event.seconds:.2f} s ({name}, seed {settings.seed})"
                if g.modality == "audio":
                    yield None, _sound(g, event.output), history, history, status
                    return
                picture = _picture(event.output)
                shown = (prompt or "").strip() if g.config.cond != "none" else "unconditional"
                caption = f"{name}: {shown} (seed {settings.seed})"
                history = [(picture, caption), *history][:GALLERY_SIZE]
                yield picture, None, history, history, status

    first = next(iter(entries))
    view = model_view(entries[first])
    with gr.Blocks(title="tessera demo") as demo:
        gr.Markdown("# tessera\nAutoregressive and masked generators on one transformer trunk.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(list(entries), value=first, label="Generator", elem_id="model")
                info = gr.Markdown(**view["info"])
                prompt = gr.Textbox(lines=1, elem_id="prompt", **view["prompt"])
                with gr.Row():
                    cfg = gr.Number(label="CFG (guidance weight, 1 = off)", elem_id="cfg", **view["cfg"])
                    temperature = gr.Number(label="Temperature (0 = greedy)", elem_id="temperature",
                                            **view["temperature"])
                with gr.Row():
                    top_k = gr.Number(label="Top-k (0 = off)", precision=0, elem_id="top_k", **view["top_k"])
                    top_p = gr.Number(label="Top-p (1 = off)", elem_id="top_p", **view["top_p"])
                with gr.Row():
                    steps = gr.Number(label=f"Steps (masked models, 1 to {MAX_STEPS})", precision=0,
                                      elem_id="steps", **view["steps"])
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                duration = gr.Number(label="Duration (seconds of audio)", elem_id="duration", **view["duration"])
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="Result", format="png", interactive=False, height=320, elem_id="result",
                                 **view["image"])
                audio = gr.Audio(label="Result", interactive=False, elem_id="audio", **view["audio"])
                status = gr.Textbox(label="Timing", interactive=False, elem_id="timing")
        gallery = gr.Gallery(label="Recent results", columns=8, fit_columns=False, height="auto", format="png",
                             elem_id="gallery")
        history = gr.State([])

        model.change(lambda name: [gr.update(**v) for v in model_view(entries[name]).values()], model,
                     [info, prompt, cfg, temperature, top_k, top_p, steps, duration, image, audio], queue=False,
                     api_visibility="private")
        gr.on([button.click, prompt.submit], generate,
              [model, prompt, cfg, temperature, top_k, top_p, steps, seed, duration, history],
              [image, audio, gallery, history, status], api_name="generate", concurrency_id="generate")

        def generation_stats() -> dict[str, int]:
            """Generations running now, the most at once, served, rejected (bad input), failed; the limit."""
            return stats.snapshot()
        gr.api(generation_stats, api_name="stats", concurrency_limit=None)
    return demo.queue(default_concurrency_limit=concurrency_limit)


def launch(ckpts: Sequence[str | Path] = (), host: str = "127.0.0.1", port: int = 7860, concurrency: int = 2,
           device: str | None = None) -> None:
    """Serve the demo over the shipped models and `ckpts` until interrupted."""
    build_app(demo_models(ckpts), concurrency, device).launch(server_name=host, server_port=port, css=CSS)
