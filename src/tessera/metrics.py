"""Small metrics shared by training logs, tests and the quickstart."""
from __future__ import annotations

import torch


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of (B, C, H, W) images in [-1, 1] (data range 2), as a 0-d tensor.

    Images are clamped to [-1, 1]; identical images give a large finite value (MSE floored at 1e-10).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"psnr needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()
