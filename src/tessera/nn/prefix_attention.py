"""FlashAttention (forward and backward, Triton) for prefix masks: query row i sees keys [0, kv_end[i]),
with kv_end non-decreasing. Block-causal (VAR's next-scale mask) and causal masks are of this form.

PyTorch's kernels take such a mask only as a dense boolean matrix, which they read in full and
apply to every tile: on VAR-d16's 680-token block-causal sequence (H100, bf16) cuDNN with the
dense mask takes 1.6-1.8 ms forward + backward, and unmasked attention over all 680 keys 1.1 ms,
although only 62% of the score matrix is visible. These kernels take kv_end itself: key tiles
wholly visible to a query tile run without a mask, tiles it partly sees are masked from kv_end,
and tiles it cannot see are never loaded. The same holds in the backward, which walks, for each
key tile, only the query tiles that see it. There they take 0.2 ms forward and 0.57 ms backward.

The algorithm is FlashAttention-2's: an online softmax over key tiles in the forward, which
saves the per-row log-sum-exp; a backward of two kernels, one per query tile (dQ, and
rowsum(dO * O) for the other) and one per key tile (dK, dV), recomputing the probabilities from
the saved log-sum-exp. Scores and sums are float32; the probabilities are cast to the inputs'
dtype for the matmuls with V and dO. On a GPU the kernels take bf16 and fp16 inputs (float32
ones, whose matmuls would run in TF32, go to the reference).

On CUDA it runs as the custom op `tessera::prefix_attention` (opaque to torch.compile, its
autograd registered). With TRITON_INTERPRET=1 set before import (tests), the kernels run in
Triton's CPU interpreter on CPU tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .decode_attention import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: SDPA with a dense mask serves
    triton = None

ROW_GRANULE = 16  # PrefixMask.first_rows is tabulated every ROW_GRANULE keys; tile sizes are multiples of it
HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Chosen on an H100 (bf16, head size 64, VAR-d16's 680 tokens) with bench/attention_block_causal.py --sweep.
FORWARD_TILES = TileConfig(64, 64, 4, 3)
BACKWARD_KV_TILES = TileConfig(32, 128, 4, 3)
BACKWARD_Q_TILES = TileConfig(64, 32, 4, 3)


@dataclass(frozen=True, eq=False)
class PrefixMask:
    """A prefix mask on the device: kv_end (Lq,) int32, and first_rows (Lk / ROW_GRANULE + 2,) int32,
    first_rows[j] = the first query row whose kv_end >= j * ROW_GRANULE (Lq if none)."""

    kv_end: torch.Tensor
    first_rows: torch.Tensor

    @staticmethod
    def from_kv_end(kv_end: torch.Tensor, kv_len: int) -> "PrefixMask":
        """Checks that kv_end is a non-decreasing (Lq,) in [1, kv_len] and tabulates first_rows."""
        if kv_end.dim() != 1 or kv_end.numel() == 0:
            raise ValueError(f"kv_end must be a non-empty 1-D tensor, got shape {tuple(kv_end.shape)}")
        if int(kv_end.min()) < 1 or int(kv_end.max()) > kv_len or bool((kv_end[1:] < kv_end[:-1]).any()):
            raise ValueError(f"kv_end must be non-decreasing within [1, {kv_len}] (every row sees a key)")
        kv_end = kv_end.to(torch.int32).contiguous()
        granules = torch.arange(kv_len // ROW_GRANULE + 2, device=kv_end.device, dtype=torch.int32) * ROW_GRANULE
        first_rows = torch.searchsorted(kv_end, granules, right=False).to(torch.int32)
        return PrefixMask(kv_end, first_rows)

    @staticmethod
    def block_causal(block_sizes: tuple[int, ...], device: torch.device | str) -> "PrefixMask":
        """Each row sees the keys up to the end of its block."""
        sizes = torch.tensor(block_sizes, device=device)
        kv_end = torch.repeat_interleave(torch.cumsum(sizes, 0), sizes)
        return PrefixMask.from_kv_end(kv_end, int(sizes.sum()))

    @staticmethod
    def causal(length: int, device: torch.device | str) -> "PrefixMask":
        """Each row sees the keys up to itself."""
        return PrefixMask.from_kv_end(torch.arange(1, length + 1, device=device), length)

    def dense(self, kv_len: int) -> torch.Tensor:
        """The same mask as a boolean (Lq, Lk) matrix."""
        return torch.arange(kv_len, device=self.kv_end.device)[None, :] < self.kv_end[:, None]


def prefix_attention_supported(q: torch.Tensor) -> bool:
    """Whether the kernels run for these (B, H, L, D) queries: Triton on their device, a head size
    they take, and on a GPU a 16-bit dtype."""
    half = q.dtype in (torch.float16, torch.bfloat16) or q.device.type != "cuda"
    return triton_available(q.device) and q.shape[-1] in HEAD_DIMS and half


def prefix_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PrefixMask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v under the prefix mask, by SDPA with the dense mask: the plain path."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(k.shape[-2]))


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PrefixMask) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D) under the prefix mask: the kernels where
    they run (`prefix_attention_supported`), else the reference."""
    if not prefix_attention_supported(q):
        return prefix_attention_reference(q, k, v, mask)
    out, _ = _forward_op(q, k, v, mask.kv_end, mask.first_rows)
    return out


@torch.library.custom_op("tessera::prefix_attention", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_end: torch.Tensor,
                first_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_prefix_attention(q, k, v, kv_end)


@_forward_op.register_fake
def _(q, k, v, kv_end, first_rows):
    b, h, length, _ = q.shape
    return empty_rows_major(q), q.new_empty(b, h, length, dtype=torch.float32)


@torch.library.custom_op("tessera::prefix_attention_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, kv_end: torch.Tensor,
                 first_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_prefix_attention_backward(grad, q, k, v, out, lse, kv_end, first_rows)


@_backward_op.register_fake
def _(grad, q, k, v, out, lse, kv_end, first_rows):
    return empty_rows_major(q), empty_rows_major(k), empty_rows_major(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_end, first_rows = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_end, first_rows)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
    q, k, v, out, lse, kv_end, first_rows = ctx.saved_tensors
    grad_q, grad_k, grad_v = _backward_op(grad_out, q, k, v, out, lse, kv_end, first_rows)
    return grad_q, grad_k, grad_v, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_end: torch.Tensor) -> None:
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d or d not in HEAD_DIMS:
        raise ValueError(f"prefix_attention wants q (B, H, Lq, D), k and v (B, H, Lk, D) with D in {HEAD_DIMS}; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kv_end.shape != (lq,):
        raise ValueError(f"kv_end must have one entry per query row ({lq}), got shape {tuple(kv_end.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("prefix_attention wants q, k and v contiguous in their last dimension")


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def empty_rows_major(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, L, D) view of (B, L, H, D) memory shaped like t: the layout the kernels here and in
    `qk_norm_rope` write, which the trunk reshapes for free (also under fake tensors)."""
    b, h, length, d = t.shape
    return t.new_empty(b, length, h, d).transpose(1, 2)


def triton_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_end: torch.Tensor,
                            tiles: TileConfig = FORWARD_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel: the output (a (B, H, Lq, D) view of (B, Lq, H, D) memory) and the per-row
    log-sum-exp of the scaled scores in base 2 (B, H, Lq), float32."""
    _check(q, k, v, kv_end)
    b, h, lq, d = q.shape
    out = empty_rows_major(q)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(lq, tiles.block_m), b * h)
    _prefix_attention_forward[grid](q, k, v, out, lse, kv_end, h, lq, k.shape[2], *_strides(q), *_strides(k),
                                    *_strides(v), *_strides(out), math.log2(math.e) / math.sqrt(d), HEAD_DIM=d,
                                    BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                                    num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out, lse


def triton_prefix_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     out: torch.Tensor, lse: torch.Tensor, kv_end: torch.Tensor,
                                     first_rows: torch.Tensor, kv_tiles: TileConfig = BACKWARD_KV_TILES,
                                     q_tiles: TileConfig = BACKWARD_Q_TILES,
                                     grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels: dQ, dK, dV, each by default a (B, H, L, D) view of (B, L, H, D) memory;
    `grads` names the three (B, H, L, D) tensors to write instead (dK and dV with equal strides)."""
    _check(q, k, v, kv_end)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)  # rowsum(dO * O), by the dQ kernel
    grad_q, grad_k, grad_v = grads or (empty_rows_major(q), empty_rows_major(k), empty_rows_major(v))
    if (grad_q.shape != q.shape or grad_k.shape != k.shape or grad_v.stride() != grad_k.stride()
            or grad_q.stride(-1) != 1 or grad_k.stride(-1) != 1):
        raise ValueError("the gradients to write must be shaped like q, k and v, dK and dV with equal strides")
    sm_scale = 1.0 / math.sqrt(d)
    common = (h, lq, lk, *_strides(q), *_strides(k), *_strides(v), *_strides(grad), sm_scale * math.log2(math.e))
    _prefix_attention_backward_q[(triton.cdiv(lq, q_tiles.block_m), b * h)](
        q, k, v, grad, out, lse, delta, kv_end, grad_q, *common, *_strides(out), *_strides(grad_q), sm_scale,
        HEAD_DIM=d, BLOCK_M=q_tiles.block_m, BLOCK_N=q_tiles.block_n,
        num_warps=q_tiles.num_warps, num_stages=q_tiles.num_stages)
    _prefix_attention_backward_kv[(triton.cdiv(lk, kv_tiles.block_n), b * h)](
        q, k, v, grad, lse, delta, kv_end, first_rows, grad_k, grad_v, *common, *_strides(grad_k), sm_scale,
        HEAD_DIM=d, BLOCK_M=kv_tiles.block_m, BLOCK_N=kv_tiles.block_n, GRANULE=ROW_GRANULE,
        num_warps=kv_tiles.num_warps, num_stages=kv_tiles.num_stages)
    return grad_q, grad_k, grad_v


if triton is not None:
    @triton.jit
    def _head_base(bh, n_heads, stride_b, stride_h):
        """Element offset of head `bh` (batch * n_heads + head) in a strided (B, H, L, D) tensor."""
        return (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads).to(tl.int64) * stride_h

    @triton.jit
    def _tile_offsets(bh, n_heads, rows, cols, stride_b, stride_h, stride_l):
        """Element offsets of rows x cols of head `bh` in a strided (B, H, L, D) tensor."""
        return _head_base(bh, n_heads, stride_b, stride_h) + rows[:, None] * stride_l + cols[None, :]

    @triton.jit
    def _load_tile(X, bh, n_heads, rows, cols, stride_b, stride_h, stride_l, n_rows):
        """Rows x cols of head `bh` from a strided (B, H, L, D) tensor, zeros past row n_rows."""
        return tl.load(X + _tile_offsets(bh, n_heads, rows, cols, stride_b, stride_h, stride_l),
                       mask=(rows < n_rows)[:, None], other=0.0)

    @triton.jit
    def _query_tile(Q, KvEnd, n_heads, lq, lk, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb,
                    stride_vh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's query tile: its head, rows, columns and q; each row's kv_end (lk past the last
        row: such rows compute, unstored); the end of the key tiles every row sees and of the keys any
        row sees; the K and V offsets of the head."""
        bh = tl.program_id(1)
        start_m = tl.program_id(0) * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, HEAD_DIM)
        q = _load_tile(Q, bh, n_heads, rows, cols, stride_qb, stride_qh, stride_ql, lq)
        ends = tl.load(KvEnd + rows, mask=rows < lq, other=lk)
        unmasked_stop = (tl.load(KvEnd + start_m) // BLOCK_N) * BLOCK_N
        last_end = tl.load(KvEnd + tl.minimum(start_m + BLOCK_M, lq) - 1)
        return (bh, rows, cols, q, ends, unmasked_stop, last_end, _head_base(bh, n_heads, stride_kb, stride_kh),
                _head_base(bh, n_heads, stride_vb, stride_vh))

    @triton.jit
    def _forward_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, kv_start, kv_stop, ends, offs_n, cols, stride_kl,
                       stride_vl, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
        """Online softmax over key tiles [kv_start, kv_stop); MASKED applies key < ends[row]."""
        for start_n in range(kv_start, kv_stop, BLOCK_N):
            keys = start_n + offs_n
            k = tl.load(K + k_base + keys[None, :] * stride_kl + cols[:, None], mask=keys[None, :] < kv_stop, other=0.0)
            scores = tl.dot(q, k) * qk_scale
            if MASKED:
                scores = tl.where(keys[None, :] < ends[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + v_base + keys[:, None] * stride_vl + cols[None, :], mask=keys[:, None] < kv_stop, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _prefix_attention_forward(Q, K, V, Out, Lse, KvEnd, n_heads, lq, lk, stride_qb, stride_qh, stride_ql,
                                  stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                                  stride_ob, stride_oh, stride_ol, qk_scale,
                                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh, rows, cols, q, ends, unmasked_stop, last_end, k_base, v_base = _query_tile(
            Q, KvEnd, n_heads, lq, lk, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb, stride_vh,
            HEAD_DIM, BLOCK_M, BLOCK_N)
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = rows < lq
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, 0, unmasked_stop, ends, offs_n, cols,
                                       stride_kl, stride_vl, qk_scale, False, BLOCK_N)
        acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, unmasked_stop, last_end, ends, offs_n,
                                       cols, stride_kl, stride_vl, qk_scale, True, BLOCK_N)
        out = acc / l_i[:, None]
        tl.store(Out + _tile_offsets(bh, n_heads, rows, cols, stride_ob, stride_oh, stride_ol),
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + bh.to(tl.int64) * lq + rows, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _backward_kv_tiles(dk, dv, k, v, Q, G, Lse, Delta, KvEnd, q_base, g_base, row_base, row_start, row_stop,
                           lq, keys, offs_m, cols, stride_ql, stride_gl, qk_scale,
                           MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
        """dK and dV of one key tile from query tiles [row_start, row_stop); MASKED applies key < kv_end[row]."""
        for start_m in range(row_start, row_stop, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < lq
            q = tl.load(Q + q_base + rows[None, :] * stride_ql + cols[:, None], mask=row_ok[None, :], other=0.0)
            lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))  # rows past the end: p = 0
            p_t = tl.exp2(tl.dot(k, q) * qk_scale - lse[None, :])  # (keys, rows)
            if MASKED:
                ends = tl.load(KvEnd + rows, mask=row_ok, other=0)
                p_t = tl.where(keys[:, None] < ends[None, :], p_t, 0.0)
            g = tl.load(G + g_base + rows[:, None] * stride_gl + cols[None, :], mask=row_ok[:, None], other=0.0)
            dv += tl.dot(p_t.to(g.dtype), g)
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(g))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), tl.trans(q))
        return dk, dv

    @triton.jit
    def _prefix_attention_backward_kv(Q, K, V, G, Lse, Delta, KvEnd, FirstRows, GradK, GradV, n_heads, lq, lk,
                                      stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                                      stride_vb, stride_vh, stride_vl, stride_gb, stride_gh, stride_gl, qk_scale,
                                      stride_ob, stride_oh, stride_ol, sm_scale,
                                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                      GRANULE: tl.constexpr):
        bh = tl.program_id(1)
        start_n = tl.program_id(0) * BLOCK_N
        keys = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, HEAD_DIM)
        key_ok = keys < lk
        k = _load_tile(K, bh, n_heads, keys, cols, stride_kb, stride_kh, stride_kl, lk)
        v = _load_tile(V, bh, n_heads, keys, cols, stride_vb, stride_vh, stride_vl, lk)
        # Rows with kv_end > start_n see some of these keys; rows with kv_end >= start_n + BLOCK_N see all.
        first_seen = (tl.load(FirstRows + start_n // GRANULE) // BLOCK_M) * BLOCK_M
        all_seen = tl.load(FirstRows + tl.minimum(start_n + BLOCK_N, (lk // GRANULE + 1) * GRANULE) // GRANULE)
        all_seen = tl.minimum(first_seen + tl.cdiv(all_seen - first_seen, BLOCK_M) * BLOCK_M, lq)
        q_base = _head_base(bh, n_heads, stride_qb, stride_qh)
        g_base = _head_base(bh, n_heads, stride_gb, stride_gh)
        row_base = bh.to(tl.int64) * lq
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dk, dv = _backward_kv_tiles(dk, dv, k, v, Q, G, Lse, Delta, KvEnd, q_base, g_base, row_base, first_seen,
                                    all_seen, lq, keys, offs_m, cols, stride_ql, stride_gl, qk_scale, True, BLOCK_M)
        dk, dv = _backward_kv_tiles(dk, dv, k, v, Q, G, Lse, Delta, KvEnd, q_base, g_base, row_base, all_seen,
                                    lq, lq, keys, offs_m, cols, stride_ql, stride_gl, qk_scale, False, BLOCK_M)
        out_offsets = _tile_offsets(bh, n_heads, keys, cols, stride_ob, stride_oh, stride_ol)
        tl.store(GradK + out_offsets, (dk * sm_scale).to(GradK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(GradV + out_offsets, dv.to(GradV.dtype.element_ty), mask=key_ok[:, None])

    @triton.jit
    def _backward_q_tiles(dq, q, g, lse, delta, ends, K, V, k_base, v_base, kv_start, kv_stop, offs_n, cols,
                          stride_kl, stride_vl, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
        """dQ of one query tile from key tiles [kv_start, kv_stop); MASKED applies key < ends[row]."""
        for start_n in range(kv_start, kv_stop, BLOCK_N):
            keys = start_n + offs_n
            k_t = tl.load(K + k_base + keys[None, :] * stride_kl + cols[:, None], mask=keys[None, :] < kv_stop,
                          other=0.0)
            p = tl.exp2(tl.dot(q, k_t) * qk_scale - lse[:, None])
            if MASKED:
                p = tl.where(keys[None, :] < ends[:, None], p, 0.0)
            v_t = tl.load(V + v_base + keys[None, :] * stride_vl + cols[:, None], mask=keys[None, :] < kv_stop,
                          other=0.0)
            ds = p * (tl.dot(g, v_t) - delta[:, None])
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
        return dq

    @triton.jit
    def _prefix_attention_backward_q(Q, K, V, G, Out, Lse, Delta, KvEnd, GradQ, n_heads, lq, lk,
                                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                                     stride_vb, stride_vh, stride_vl, stride_gb, stride_gh, stride_gl, qk_scale,
                                     stride_ob, stride_oh, stride_ol, stride_dqb, stride_dqh, stride_dql, sm_scale,
                                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh, rows, cols, q, ends, unmasked_stop, last_end, k_base, v_base = _query_tile(
            Q, KvEnd, n_heads, lq, lk, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_vb, stride_vh,
            HEAD_DIM, BLOCK_M, BLOCK_N)
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = rows < lq
        g = _load_tile(G, bh, n_heads, rows, cols, stride_gb, stride_gh, stride_gl, lq)
        o = _load_tile(Out, bh, n_heads, rows, cols, stride_ob, stride_oh, stride_ol, lq)
        delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
        row_base = bh.to(tl.int64) * lq
        tl.store(Delta + row_base + rows, delta, mask=row_ok)  # for the dK/dV kernel, launched next
        lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        dq = _backward_q_tiles(dq, q, g, lse, delta, ends, K, V, k_base, v_base, 0, unmasked_stop, offs_n, cols,
                               stride_kl, stride_vl, qk_scale, False, BLOCK_N)
        dq = _backward_q_tiles(dq, q, g, lse, delta, ends, K, V, k_base, v_base, unmasked_stop, last_end, offs_n,
                               cols, stride_kl, stride_vl, qk_scale, True, BLOCK_N)
        tl.store(GradQ + _tile_offsets(bh, n_heads, rows, cols, stride_dqb, stride_dqh, stride_dql),
                 (dq * sm_scale).to(GradQ.dtype.element_ty), mask=row_ok[:, None])
