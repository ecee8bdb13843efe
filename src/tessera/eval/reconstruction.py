"""Tokenizer reconstruction quality: PSNR and codebook usage over held-out images."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data.loader import make_image_loader
from ..images import save_grid
from ..metrics import psnr
from ..modeling import TesseraModel
from ..tokenizers.vq import VQTokenizer


@torch.no_grad()
def evaluate_tokenizer(ckpt: str | Path, shards: str | Path, n: int = 1000, batch_size: int = 100,
                       grid_path: str | Path | None = None, device: str | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Mean per-image PSNR over the first `n` shard images; for code tokenizers (`vq`,
    `multiscale_vq`) also the share of the codebook (and the code perplexity) they use, over all
    scales. Optionally writes a grid of (input, reconstruction) pairs."""
    if n < 1:
        raise ConfigError(f"n={n} must be at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vq = TesseraModel.from_pretrained(ckpt).to(device).eval()
    if not hasattr(vq, "decode") or not hasattr(vq, "encode"):
        raise CheckpointError(f"{ckpt} holds a '{vq.kind}' model, not an image tokenizer")
    coded = isinstance(vq, VQTokenizer)
    loader = make_image_loader(str(shards), min(batch_size, n), vq.config.image_size, seed=12345, infinite=False,
                               shuffle_buffer=0)
    psnr_sum, seen = 0.0, 0
    counts = torch.zeros(vq.vocab_size if coded else 1, dtype=torch.long, device=device)
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    bar = tqdm(total=n, desc="reconstruct", unit="img", disable=not progress)
    for batch in loader:
        images = batch["image"][: n - seen].to(device)
        codes = vq.encode(images)
        recon = vq.decode(codes).clamp(-1, 1)
        psnr_sum += float(psnr(recon, images)) * images.shape[0]
        if coded:
            counts += torch.bincount(codes.flatten(), minlength=vq.vocab_size)
        first = first or (images[:16].cpu(), recon[:16].cpu())
        seen += images.shape[0]
        bar.update(images.shape[0])
        if seen >= n:
            break
    bar.close()
    if seen == 0:
        raise ConfigError(f"no images found in {shards}")
    if grid_path is not None and first is not None:
        save_grid(torch.stack(first, 1).flatten(0, 1), grid_path, nrow=8)
    if not coded:
        return {"images": seen, "psnr_db": psnr_sum / seen}
    used = int((counts > 0).sum())
    probs = counts[counts > 0].double() / counts.sum()
    return {"images": seen, "psnr_db": psnr_sum / seen, "codes_used": used,
            "codebook_usage": used / vq.vocab_size, "codebook_size": vq.vocab_size,
            "code_perplexity": float(torch.exp(-(probs * probs.log()).sum()))}

