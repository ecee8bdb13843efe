"""Static, preallocated KV cache for incremental decoding.

Every layer owns its own fixed key and value tensors, written in place at the given positions,
so shapes never change between steps (torch.compile and CUDA-graph friendly, as in
gpt-fast/LlamaGen), unlike caches that grow by concatenation. Separate tensors per layer
matter under torch.compile: an in-place write into a view of one stacked tensor is
functionalised into a copy of the whole stack on every write.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Per-layer (B, H, max_len, D) key and value buffers."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch_size, n_heads, max_len, head_dim)
        for layer in range(n_layers):
            self.register_buffer(f"k{layer}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{layer}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.n_layers, self.batch_size, self.max_len, self.dtype = n_layers, batch_size, max_len, dtype

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (key, value) buffers of one layer."""
        return getattr(self, f"k{index}"), getattr(self, f"v{index}")

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, D) at `positions` (L,); return the layer's first `kv_len` slots.

        Attending over a static prefix `kv_len` (a bucket just past the last written slot)
        instead of all `max_len` slots reads less memory while keeping shapes static.
        """
        k_all, v_all = self.layer(layer)
        k_all[:, :, positions] = k.to(k_all.dtype)
        v_all[:, :, positions] = v.to(v_all.dtype)
        if kv_len is None:
            return k_all, v_all
        return k_all[:, :, :kv_len], v_all[:, :, :kv_len]

    def reset(self) -> None:
        for buffer in self.buffers():
            buffer.zero_()
