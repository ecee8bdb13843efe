"""Bicubic upsampling as two small matrix products.

`F.interpolate(..., mode="bicubic")` is separable: each output row (and column) is a fixed
combination of 4 input rows with clamped borders. Its CUDA kernel runs one thread per output
pixel and loops over batch x channels, so on VAR's 32-channel maps it took 3% of a d16 training
step's GPU time. The same map as `M @ x @ M.T`, with M read off `F.interpolate` itself, is the same
arithmetic up to float rounding (parity test) on tensor cores. The multi-scale VQ keeps its
matrices as buffers; `bicubic_resize` (FlowAR's scale inputs and previews) builds them on first use.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 matrix of `F.interpolate`'s 1-D bicubic resampling (align_corners=False)."""
    unit_maps = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    columns = F.interpolate(unit_maps, size=(n_out, 1), mode="bicubic", align_corners=False)
    return columns.view(n_in, n_out).t().float()


def bicubic_resample(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """(..., n_in, n_in) maps -> (..., n_out, n_out) through `matrix` = `bicubic_matrix(n_in, n_out)`,
    in x's dtype (autocast off: these are tokenizer latents, not trunk activations)."""
    with torch.autocast(x.device.type, enabled=False):
        m = matrix.to(x.dtype)
        return m @ x @ m.t()


def bicubic_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., n, n) maps -> (..., size, size): `F.interpolate(x, size=(size, size), mode="bicubic")`
    as two matrix products, the matrix built once per (n, size, device)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"bicubic_resize takes square maps, got {tuple(x.shape[-2:])}")
    return bicubic_resample(x, _cached_matrix(x.shape[-1], size, x.device))


@functools.lru_cache(maxsize=64)
def _cached_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    return bicubic_matrix(n_in, n_out).to(device)
