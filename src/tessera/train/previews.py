"""Previews written during training: reconstructions for tokenizers, samples for generators; image
grids (PNG) or, for audio models, the clips one after another (WAV)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..audio_io import join_with_silence, save_wav
from ..generators.base import Generator
from ..images import save_grid
from ..modeling import TesseraModel
from ..sample import sampler_for
from ..samplers.logits import SamplingConfig


@torch.no_grad()
def write_preview(model: TesseraModel, batch: dict[str, Any], path: Path, n: int = 16) -> Path:
    """Save input|reconstruction pairs for tokenizers, samples for generators; returns the file
    (`path`, with a .wav suffix for audio models)."""
    audio = model.modality == "audio"
    n = min(n, 4) if audio else n
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Generator):
            cond = model.batch_condition({k: v[:n] for k, v in batch.items()})
            settings = SamplingConfig(cfg=3.0 if model.has_condition else 1.0, top_k=0, seed=0)
            outputs = model.sample(cond, sampler_for(model, settings))
        else:
            originals = batch["audio" if audio else "image"][:n // 2 if n > 1 else 1]
            recon = model.decode(model.encode(originals))[..., :originals.shape[-1]]
            outputs = torch.stack([originals, recon], 1).flatten(0, 1)
        if audio:
            return save_wav(join_with_silence(outputs, model.sample_rate), path.with_suffix(".wav"), model.sample_rate)
        return save_grid(outputs, path)
    finally:
        model.train(was_training)
