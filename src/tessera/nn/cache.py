"""Static, preallocated KV cache for incremental decoding.

Keys and values live in fixed tensors written in place with `index_copy_`, so shapes never
change between steps (torch.compile and CUDA-graph friendly, as in gpt-fast/LlamaGen),
unlike caches that grow by concatenation.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Per-layer (B, H, max_len, D) key and value buffers."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, D) at `positions` (L,); return the layer's first `kv_len` slots.

        Attending over a static prefix `kv_len` (a bucket just past the last written slot)
        instead of all `max_len` slots reads less memory while keeping shapes static.
        """
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, positions, k.to(k_all.dtype))
        v_all.index_copy_(2, positions, v.to(v_all.dtype))
        if kv_len is None:
            return k_all, v_all
        return k_all[:, :, :kv_len], v_all[:, :, :kv_len]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
