"""Run the compositional benchmark on a text-conditional image generator: sample every prompt N
times, score each image exactly, summarise per task."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch

from ..config import ConfigError
from ..sample import generate, load_generator, resolve_settings
from .compositional import prompt_set, score_image, summarise
from .generative import to_uint8


def first_per_task(prompts: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first `limit` prompts of every tag, in order."""
    seen: Counter[str] = Counter()
    kept = []
    for prompt in prompts:
        if seen[prompt["tag"]] < limit:
            kept.append(prompt)
            seen[prompt["tag"]] += 1
    return kept


@torch.no_grad()
def evaluate_compositional(ckpt: str, per_prompt: int = 4, limit: int | None = None, cfg: float = 3.0,
                           device: str | None = None, batch_size: int = 64, seed: int = 0,
                           given: dict[str, Any] | None = None) -> tuple[dict[str, Any], torch.Tensor, list[bool]]:
    """The report (per-task accuracy, overall = mean of task means, per-image results), all images
    (uint8) and their pass marks. `limit` keeps the first prompts of every task (a quick run)."""
    if per_prompt < 1 or (limit is not None and limit < 1):
        raise ConfigError(f"--per-prompt and --limit must be at least 1 (got {per_prompt}, {limit})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_generator(ckpt, device=device)
    if model.config.cond != "text":
        raise ConfigError(f"{ckpt} holds a model conditioned on {model.config.cond!r}; the compositional "
                          "benchmark prompts it with captions, so it needs a text-conditional model")
    prompts = prompt_set() if limit is None else first_per_task(prompt_set(), limit)
    texts = [p["prompt"] for p in prompts for _ in range(per_prompt)]
    settings, masked = resolve_settings(model, {**(given or {}), "cfg": cfg, "seed": seed})
    start = time.perf_counter()
    images = to_uint8(generate(model, texts, len(texts), settings, batch_size, masked=masked))
    seconds = time.perf_counter() - start
    results = []
    for i, image in enumerate(images):
        meta = prompts[i // per_prompt]
        verdict = score_image(image.permute(1, 2, 0).numpy(), meta)
        results.append({"prompt": meta["prompt"], "tag": meta["tag"], **verdict})
    report = {"ckpt": str(ckpt), "prompts": len(prompts), "per_prompt": per_prompt, "cfg": cfg,
              "resolution": int(images.shape[-1]), "seconds_per_1000": 1000 * seconds / len(texts),
              **summarise(results), "images": results}
    return report, images, [r["correct"] for r in results]
