"""Single-query attention over the written prefix of a static KV cache (flash-decoding).

Incremental decoding asks one query per row to attend over cache slots [0, length), where
`length` grows by one each step. Dense kernels (cuDNN/flash SDPA with a mask) read the whole
static cache and pad the query to a tile of 64-128 rows; this Triton kernel reads only the
written slots, with `length` a device tensor, so one CUDA graph serves every step.

Work is split over (batch x head) rows and, when there are too few rows to fill the GPU, over
chunks of the key axis (partial max / sum / output per chunk, merged afterwards). On CUDA it
runs as the custom op `tessera::decode_attention`, opaque to torch.compile and capturable in
CUDA graphs. On CPU the same function runs a plain masked softmax; with TRITON_INTERPRET=1 set
before import (tests) the Triton kernel runs in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class DecodeKernelConfig:
    """Launch settings: keys per inner iteration, warps per program, how many programs to aim
    for when splitting the key axis (rows x splits), and software-pipelining stages of the key loop."""

    # From `bench/decode_step_variants.py --sweep` (H100 and H200: one warp, small blocks, no
    # key-axis split at batch 64 with CFG)
    block: int = 16
    num_warps: int = 1
    target_programs: int = 2048
    num_stages: int = 2

    def splits(self, rows: int, slots: int) -> int:
        """Key-axis chunks per row: enough programs to fill the GPU, at least `block` keys each."""
        return max(1, min(-(-self.target_programs // rows), -(-slots // self.block)))


KERNEL = DecodeKernelConfig()


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel runs for tensors on `device`."""
    return triton is not None and (device.type == "cuda" or _INTERPRET)


def reference_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over slots [0, length), in float32: the reference."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    visible = torch.arange(k.shape[-2], device=k.device) < length.reshape(())
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, D), k/v (B, H, S, D) -> (B, H, 1, D), attending over slots [0, length).

    `length` is a one-element integer tensor on the cache's device (1 <= length <= S).
    """
    if not triton_available(q.device):
        return reference_decode_attention(q, k, v, length)
    return _decode_op(q, k, v, length)


@torch.library.custom_op("tessera::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    return triton_decode_attention(q, k, v, length)


@_decode_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


def triton_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
                            config: DecodeKernelConfig | None = None) -> torch.Tensor:
    """The Triton kernels: one program per (row, key chunk); partials merged by a second kernel
    when the key axis is split."""
    config = config or KERNEL
    b, h, lq, d = q.shape
    if lq != 1 or k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise ValueError(f"decode_attention wants q (B, H, 1, D) and k, v (B, H, S, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention wants the head dimension contiguous")
    slots = k.shape[2]
    rows, splits = b * h, config.splits(b * h, slots)
    chunk = config.block * -(-slots // (config.block * splits))
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    parts = (rows, splits) if splits > 1 else (0, 1)  # the single-chunk path writes `out` directly
    part_out = torch.empty(*parts, d, dtype=torch.float32, device=q.device)
    part_max = torch.empty(parts, dtype=torch.float32, device=q.device)
    part_sum = torch.empty(parts, dtype=torch.float32, device=q.device)
    _decode_kernel[(rows, splits)](
        q, k, v, length, out, part_out, part_max, part_sum,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, chunk, d ** -0.5, D=d, DP=triton.next_power_of_2(d), BLOCK=config.block, SPLITS=splits,
        STAGES=config.num_stages, num_warps=config.num_warps)
    if splits > 1:
        _merge_kernel[(rows,)](part_out, part_max, part_sum, out, D=d, DP=triton.next_power_of_2(d), SPLITS=splits,
                               PADDED=triton.next_power_of_2(splits), num_warps=1)
    return out


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, K, V, Length, Out, PartOut, PartMax, PartSum,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                       n_heads, chunk, scale,
                       D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                       STAGES: tl.constexpr):
        row = tl.program_id(0)
        split = tl.program_id(1)
        bi = row // n_heads
        hi = row % n_heads
        dims = tl.arange(0, DP)  # the head dim padded to a power of two (Triton's ranges must be)
        real_dims = dims < D
        q = tl.load(Q + bi * stride_qb + hi * stride_qh + dims, mask=real_dims, other=0.0).to(tl.float32) * scale
        k_base = K + bi * stride_kb + hi * stride_kh
        v_base = V + bi * stride_vb + hi * stride_vh
        start = split * chunk
        end = tl.minimum(start + chunk, tl.load(Length).to(tl.int32))
        run_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        run_sum = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        acc = tl.zeros([DP], tl.float32)
        for first in tl.range(start, end, BLOCK, num_stages=STAGES):
            slots = first + tl.arange(0, BLOCK)
            valid = slots < end
            # Both loads are issued before either is used, so their latencies overlap.
            both = valid[:, None] & real_dims[None, :]
            keys = tl.load(k_base + slots[:, None] * stride_ks + dims[None, :], mask=both, other=0.0)
            values = tl.load(v_base + slots[:, None] * stride_vs + dims[None, :], mask=both, other=0.0)
            scores = tl.where(valid, tl.sum(keys.to(tl.float32) * q[None, :], 1), float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, 0))
            alpha = tl.exp(run_max - new_max)
            p = tl.exp(scores - new_max)
            acc = acc * alpha + tl.sum(p[:, None] * values.to(tl.float32), 0)
            run_sum = run_sum * alpha + tl.sum(p, 0)
            run_max = new_max
        if SPLITS == 1:
            tl.store(Out + row * D + dims, (acc / run_sum).to(Out.dtype.element_ty), mask=real_dims)
        else:
            part = row * SPLITS + split
            tl.store(PartOut + part * D + dims, acc, mask=real_dims)
            tl.store(PartMax + part, run_max)
            tl.store(PartSum + part, run_sum)


    @triton.jit
    def _merge_kernel(PartOut, PartMax, PartSum, Out, D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr,
                      PADDED: tl.constexpr):
        row = tl.program_id(0)
        dims = tl.arange(0, DP)
        real_dims = dims < D
        chunks = tl.arange(0, PADDED)
        real = chunks < SPLITS
        maxes = tl.load(PartMax + row * SPLITS + chunks, mask=real, other=float("-inf"))
        weight = tl.exp(maxes - tl.max(maxes, 0))  # empty or padding chunks: max -inf, weight 0
        total = tl.sum(tl.load(PartSum + row * SPLITS + chunks, mask=real, other=0.0) * weight, 0)
        parts = tl.load(PartOut + (row * SPLITS + chunks[:, None]) * D + dims[None, :],
                        mask=real[:, None] & real_dims[None, :], other=0.0)
        tl.store(Out + row * D + dims, (tl.sum(parts * weight[:, None], 0) / total).to(Out.dtype.element_ty),
                 mask=real_dims)
