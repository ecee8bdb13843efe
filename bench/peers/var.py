"""Adapter that runs FoundationVision/VAR's own `VAR.autoregressive_infer_cfg` for benchmarks.

VAR's code is never copied into this repository. Put its files, unmodified, in a local folder
that git ignores (default `.peers/VAR`, listed in `.git/info/exclude`) and carry that folder:

    .peers/VAR/models/{__init__,basic_vae,basic_var,helpers,quant,var,vqvae}.py   (@78b9539)
    .peers/VAR/dist.py                                                            (var.py imports it)

Facts this adapter relies on (checked against 78b9539):
- `models.build_vae_var(device, patch_nums, V, Cvae, ch, share_quant_resi, num_classes, depth, ...)`
  builds the multi-scale VQVAE and VAR (width 64 * depth, heads = depth) and calls `init_weights`.
  It replaces `reset_parameters` of nn.Linear, nn.Conv2d, norms ... with a no-op for the whole
  process; the adapter puts the originals back afterwards, so models built later still initialise.
  `init_weights` initialises VAR but not the VQVAE (which VAR always loads from a checkpoint), so
  the adapter runs the VQVAE's layers' own `reset_parameters` (random weights, as on our side).
- `autoregressive_infer_cfg(B, label_B, g_seed, cfg, top_k, top_p)` runs the 10-scale loop with
  its concatenating KV cache, CFG as a doubled batch with t = cfg * si / (S - 1) (standard
  w = 1 + t), top-k then top-p, and decodes f_hat to images in [0, 1] (decoder included).
- Precision: VAR's demo runs it under `torch.autocast` (fp16) with fp32 weights; here bf16 autocast.
- `dist.get_device()` defaults to cuda when available; no initialisation is needed.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_DIR = ".peers/VAR"
REQUIRED_FILES = ("models/var.py", "models/basic_var.py", "models/vqvae.py", "models/quant.py",
                  "models/basic_vae.py", "models/helpers.py", "models/__init__.py", "dist.py")
_PATCHED = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d,
            nn.ConvTranspose2d)


class VARUnavailable(RuntimeError):
    """VAR's files are not where the adapter was told to look."""


def import_var(var_dir: str | Path = DEFAULT_DIR) -> Any:
    """VAR's `models` package, imported from `var_dir` (checked not to be shadowed)."""
    root = Path(var_dir).resolve()
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise VARUnavailable(f"VAR files missing under {root}: {', '.join(missing)}; copy them unmodified from "
                             "FoundationVision/VAR @78b9539 (see bench/peers/var.py)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    models = importlib.import_module("models")
    for name in ("models", "dist"):
        module = sys.modules[name]
        if not Path(module.__file__).resolve().is_relative_to(root):
            raise VARUnavailable(f"{name} was imported from {module.__file__}, not from {root}")
    return models


@contextlib.contextmanager
def _keep_reset_parameters():
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in _PATCHED}
    try:
        yield
    finally:
        for cls, method in saved.items():
            if method is not None:
                cls.reset_parameters = method
            elif "reset_parameters" in cls.__dict__:  # VAR set it on a class that inherits it
                delattr(cls, "reset_parameters")


class VARSampler:
    """A random-weight VAR (+ its VQVAE) sampling images with its own `autoregressive_infer_cfg`."""

    def __init__(self, *, depth: int, patch_nums: tuple[int, ...], vocab_size: int, num_classes: int, ch: int,
                 device: str, dtype: torch.dtype, cfg: float, top_k: int, top_p: float, seed: int = 0,
                 var_dir: str | Path = DEFAULT_DIR):
        models = import_var(var_dir)
        torch.manual_seed(seed)
        with _keep_reset_parameters():
            self.vae, self.var = models.build_vae_var(
                device=device, patch_nums=patch_nums, V=vocab_size, Cvae=32, ch=ch, share_quant_resi=4,
                num_classes=num_classes, depth=depth, shared_aln=False, attn_l2_norm=True)
        for module in self.vae.modules():  # built with no-op reset_parameters and never loaded: initialise
            if isinstance(module, _PATCHED):
                module.reset_parameters()
        bad = [n for n, t in [*self.var.named_parameters(), *self.vae.named_parameters()] if not torch.isfinite(t).all()]
        if bad:
            raise VARUnavailable(f"VAR built with non-finite weights (e.g. {bad[:3]})")
        self.var.eval()
        self.vae.eval()
        self.device, self.dtype = torch.device(device), dtype
        self.cfg, self.top_k, self.top_p, self.seed = cfg, top_k, top_p, seed
        self.n_params = sum(p.numel() for p in self.var.parameters())

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        autocast = self.device.type == "cuda" and self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            return self.var.autoregressive_infer_cfg(labels.shape[0], labels, g_seed=self.seed, cfg=self.cfg,
                                                     top_k=self.top_k, top_p=self.top_p)
