"""QK-norm and rotary embedding in one pass: RMSNorm over each head's query (or key) vector,
its learned gain, then the half-split RoPE rotation, forward and backward.

Done as separate PyTorch ops (`rms_norm_rope_reference`), Inductor makes several float32 passes
over q and k in the forward and more in the backward; on VAR-d16's block (H100, bf16) QK-norm and
RoPE cost 0.64 ms of a 5.7 ms block (bench/block_ablation.py). The Triton kernels here read
each row once and write it once: the forward writes the rotated rows as (B, L, H, D) in the
input's dtype (returned as a (B, H, L, D) view, the layout SDPA reads); the backward recomputes
the norm from the input, writes the input's gradient and per-program partial sums of the gain's
gradient. Unlike the reference, the normalised rows are not rounded to the input's dtype before
the rotation.

On CUDA it runs as the custom op `tessera::rms_norm_rope` (opaque to torch.compile, with its
autograd formula registered); elsewhere the reference runs. With TRITON_INTERPRET=1 set before
import (tests), the kernels run in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import torch

from .decode_attention import triton_available
from .layers import rms_norm
from .prefix_attention import empty_rows_major
from .rope import apply_rotary

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

ROWS_PER_PROGRAM = 64


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            eps: float) -> torch.Tensor:
    """(B, H, L, D) rows normalised (float32, then the input's dtype), scaled by `weight`, rotated
    by the (L, D/2) tables: the trunk's plain path."""
    return apply_rotary(rms_norm(x, weight, eps), cos, sin)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """x (B, H, L, D) -> rotated, normalised (B, H, L, D); the fused kernels where Triton runs
    (and D / 2 is a power of two, as Triton's ranges must be)."""
    if weight.shape != x.shape[-1:]:  # e.g. a ZeRO-3 shard not gathered: the kernel would read past it
        raise ValueError(f"the norm weight has shape {tuple(weight.shape)}; ({x.shape[-1]},) expected")
    half = x.shape[-1] // 2
    if not triton_available(x.device) or half & (half - 1):
        return rms_norm_rope_reference(x, weight, cos, sin, eps)
    return _fused_op(x, weight, cos, sin, eps)


@torch.library.custom_op("tessera::rms_norm_rope", mutates_args=())
def _fused_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    return triton_rms_norm_rope(x, weight, cos, sin, eps)


@_fused_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    return empty_rows_major(x)


@torch.library.custom_op("tessera::rms_norm_rope_backward", mutates_args=())
def _fused_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_rms_norm_rope_backward(grad, x, weight, cos, sin, eps)


@_fused_backward_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return empty_rows_major(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, cos, sin, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps = eps


def _backward(ctx, grad: torch.Tensor):
    x, weight, cos, sin = ctx.saved_tensors
    grad_x, grad_weight = _fused_backward_op(grad, x, weight, cos, sin, ctx.eps)
    return grad_x, grad_weight, None, None, None


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, cos: torch.Tensor) -> tuple[int, int, int, int]:
    b, h, length, d = x.shape
    if d % 2 or cos.shape != (length, d // 2) or x.stride(-1) != 1:
        raise ValueError(f"rms_norm_rope wants x (B, H, L, D) with D even and contiguous, and (L, D/2) tables; "
                         f"got x {tuple(x.shape)} strides {x.stride()}, tables {tuple(cos.shape)}")
    return b, h, length, d


def triton_rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """The forward kernel: one program per ROWS_PER_PROGRAM (position, head) rows."""
    b, h, length, d = _check(x, cos)
    out = empty_rows_major(x)  # the kernel writes row r = (batch, position, head) at r * D
    rows = b * length * h
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _rms_norm_rope_forward[grid](x, weight, cos.contiguous(), sin.contiguous(), out, rows, length, h,
                          x.stride(0), x.stride(1), x.stride(2), eps, HALF=d // 2, ROWS=ROWS_PER_PROGRAM)
    return out


def triton_rms_norm_rope_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, eps: float, grad_x: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel: the input's gradient as (B, H, L, D) (by default a view of (B, L, H, D)
    memory; `grad_x` names another (B, H, L, D) tensor to write, which may be `grad` itself: each
    program reads its rows before writing them) and the gain's gradient, summed from per-program partials."""
    b, h, length, d = _check(x, cos)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    if grad_x is None:
        grad_x = empty_rows_major(x)
    elif grad_x.shape != x.shape or grad_x.stride(-1) != 1:
        raise ValueError(f"grad_x must be a {tuple(x.shape)} tensor contiguous in its last dimension")
    rows = b * length * h
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    partial = torch.empty(programs, d, dtype=torch.float32, device=x.device)
    _rms_norm_rope_backward[(programs,)](grad, x, weight, cos.contiguous(), sin.contiguous(), grad_x, partial, rows,
                                  length, h, grad.stride(0), grad.stride(1), grad.stride(2),
                                  x.stride(0), x.stride(1), x.stride(2),
                                  grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), eps,
                                  HALF=d // 2, ROWS=ROWS_PER_PROGRAM)
    return grad_x, partial.sum(0).to(weight.dtype)


if triton is not None:
    @triton.jit
    def _row_offsets(start, rows, length, n_heads, stride_b, stride_h, stride_l, ROWS: tl.constexpr):
        """Rows are (batch, position, head) in that order; returns their offsets, positions and validity."""
        r = start + tl.arange(0, ROWS)
        valid = r < rows
        head = r % n_heads
        pos = (r // n_heads) % length
        batch = r // (n_heads * length)
        return batch * stride_b + head * stride_h + pos * stride_l, pos, r, valid

    @triton.jit
    def _rms_norm_rope_forward(X, W, Cos, Sin, Out, rows, length, n_heads, stride_b, stride_h, stride_l, eps,
                        HALF: tl.constexpr, ROWS: tl.constexpr):
        offsets, pos, r, valid = _row_offsets(tl.program_id(0) * ROWS, rows, length, n_heads,
                                              stride_b, stride_h, stride_l, ROWS)
        cols = tl.arange(0, HALF)
        m = valid[:, None]
        x1 = tl.load(X + offsets[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + offsets[:, None] + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        n1 = x1 * rstd[:, None] * tl.load(W + cols).to(tl.float32)[None, :]
        n2 = x2 * rstd[:, None] * tl.load(W + HALF + cols).to(tl.float32)[None, :]
        c = tl.load(Cos + pos[:, None] * HALF + cols[None, :], mask=m, other=0.0)
        s = tl.load(Sin + pos[:, None] * HALF + cols[None, :], mask=m, other=0.0)
        out = Out + r[:, None] * (2 * HALF) + cols[None, :]  # (B, L, H, D) contiguous: row r at r * D
        tl.store(out, (n1 * c - n2 * s).to(Out.dtype.element_ty), mask=m)
        tl.store(out + HALF, (n2 * c + n1 * s).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_rope_backward(G, X, W, Cos, Sin, GradX, Partial, rows, length, n_heads,
                         stride_gb, stride_gh, stride_gl, stride_b, stride_h, stride_l,
                         stride_ob, stride_oh, stride_ol, eps, HALF: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        offsets, pos, r, valid = _row_offsets(pid * ROWS, rows, length, n_heads, stride_b, stride_h, stride_l, ROWS)
        g_offsets, _, _, _ = _row_offsets(pid * ROWS, rows, length, n_heads, stride_gb, stride_gh, stride_gl, ROWS)
        o_offsets, _, _, _ = _row_offsets(pid * ROWS, rows, length, n_heads, stride_ob, stride_oh, stride_ol, ROWS)
        cols = tl.arange(0, HALF)
        m = valid[:, None]
        g1 = tl.load(G + g_offsets[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g2 = tl.load(G + g_offsets[:, None] + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(Cos + pos[:, None] * HALF + cols[None, :], mask=m, other=0.0)
        s = tl.load(Sin + pos[:, None] * HALF + cols[None, :], mask=m, other=0.0)
        dn1 = g1 * c + g2 * s  # the rotation's transpose
        dn2 = g2 * c - g1 * s
        x1 = tl.load(X + offsets[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + offsets[:, None] + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        xhat1 = x1 * rstd[:, None]
        xhat2 = x2 * rstd[:, None]
        tl.store(Partial + pid * (2 * HALF) + cols, tl.sum(dn1 * xhat1, 0))
        tl.store(Partial + pid * (2 * HALF) + HALF + cols, tl.sum(dn2 * xhat2, 0))
        dxhat1 = dn1 * tl.load(W + cols).to(tl.float32)[None, :]
        dxhat2 = dn2 * tl.load(W + HALF + cols).to(tl.float32)[None, :]
        mean = (tl.sum(dxhat1 * xhat1, 1) + tl.sum(dxhat2 * xhat2, 1)) / (2 * HALF)
        out = GradX + o_offsets[:, None] + cols[None, :]
        tl.store(out, (rstd[:, None] * (dxhat1 - xhat1 * mean[:, None])).to(GradX.dtype.element_ty), mask=m)
        tl.store(out + HALF, (rstd[:, None] * (dxhat2 - xhat2 * mean[:, None])).to(GradX.dtype.element_ty), mask=m)
