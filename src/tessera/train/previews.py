"""Preview grids written during training: reconstructions for tokenizers, samples for generators."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..generators.base import Generator
from ..images import save_grid
from ..modeling import TesseraModel
from ..sample import sampler_for
from ..samplers.logits import SamplingConfig


@torch.no_grad()
def write_preview(model: TesseraModel, batch: dict[str, Any], path: Path, n: int = 16) -> None:
    """Save a grid: input|reconstruction pairs for tokenizers, samples for generators."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Generator):
            cond = model.batch_condition({k: v[:n] for k, v in batch.items()})
            settings = SamplingConfig(cfg=3.0 if model.has_condition else 1.0, top_k=0, seed=0)
            images = model.sample(cond, sampler_for(model, settings))
        else:
            originals = batch["image"][:n // 2 if n > 1 else 1]
            images = torch.stack([originals, model.decode(model.encode(originals))], 1).flatten(0, 1)
        save_grid(images, path)
    finally:
        model.train(was_training)
