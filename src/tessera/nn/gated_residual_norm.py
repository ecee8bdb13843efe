"""An AdaLN block's gated residual add and the modulated norm after it, in one pass each way:
x1 = x + (1 + gate) * a, then n(x1) * (1 + scale) + shift. The trunk runs it twice per block: after
attention (a: the attention output; the norm: the MLP input's), and at the next block's start or in
the final norm (a: the previous block's MLP output, handed on unadded; see nn/trunk.py).

Compiled by Inductor, the backward of this step needs the norm's sums along each row and the gate,
shift and scale gradients' sums over positions: reductions along different axes, which Inductor
does not fuse into one kernel, so x, a and the incoming gradients are read more than once. The
Triton kernels here give each program one sample's run of positions with whole rows, so both kinds
of sum come out of one read: the backward reads x, a and the two incoming gradients once, writes the
gradients of x and a once, and leaves per-program partial sums of the modulation gradients (summed
afterwards, 17 MB at VAR-d16's batch 128). The forward writes x1 and the normalised output together.
Arithmetic is float32; x1 and the normalised rows are rounded to x1's dtype where the plain path
rounds them.

On an H100 at VAR-d16's shape (batch 128, 680 positions, width 1024, bf16) the forward kernel takes
0.27 ms and the backward kernel 0.43 ms (profiled in the training step). Used after attention only,
the training step gained 0.7% and 1.4% tokens/s on two machines; used at both places, another
1.0-1.7% (three runs against two on one machine). The tiling was chosen among those
bench/pointwise_kernel_sweep.py sweeps (one 4-row, 8-warp tiling took 1.08 ms backward).

On CUDA it runs as the custom op `tessera::gated_residual_norm` (opaque to torch.compile, its autograd
registered); elsewhere the reference runs. With TRITON_INTERPRET=1 set before import (tests), the
kernels run in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import torch

from .decode_attention import triton_available
from .layers import modulate, rms_norm

try:
    import triton
    import triton.language as tl

    _TRITON_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                      torch.float16: tl.float16}
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

ROWS_PER_PROGRAM = 64  # positions of one sample per program: fewer partial sums vs. more programs
ROWS_PER_STEP = 2  # rows loaded together in a program's loop
NUM_WARPS = 4


def gated_residual_norm_reference(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + (1 + gate) * a, modulate(rms_norm(x1), shift, scale)) as PyTorch ops: the plain path."""
    x1 = x + (1 + gate) * a
    return x1, modulate(rms_norm(x1, None, eps), shift, scale)


def gated_residual_norm(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                        scale: torch.Tensor, eps: float, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x, a (B, L, C) and the (B, 1, C) modulation -> (x1, x1 normalised and modulated), both
    (B, L, C): the Triton kernels where they run and `fused` is set, else the reference."""
    if a.shape != x.shape or x.dim() != 3 or any(t.shape != (x.shape[0], 1, x.shape[2]) for t in (gate, shift, scale)):
        raise ValueError(f"gated_residual_norm wants x and a (B, L, C) and (B, 1, C) modulation; got "
                         f"{tuple(x.shape)}, {tuple(a.shape)}, {[tuple(t.shape) for t in (gate, shift, scale)]}")
    if not fused or not triton_available(x.device) or x.numel() == 0:
        return gated_residual_norm_reference(x, a, gate, shift, scale, eps)
    return _fused_op(x, a, gate, shift, scale, eps)


def _out_dtypes(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes the plain path gives x1 and the normalised output."""
    x1 = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, a.dtype))
    return x1, torch.promote_types(x1, torch.promote_types(shift.dtype, scale.dtype))


@torch.library.custom_op("tessera::gated_residual_norm", mutates_args=())
def _fused_op(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_gated_residual_norm(x, a, gate, shift, scale, eps)


@_fused_op.register_fake
def _(x, a, gate, shift, scale, eps):
    x1_dtype, out_dtype = _out_dtypes(x, a, gate, shift, scale)
    return x.new_empty(x.shape, dtype=x1_dtype), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("tessera::gated_residual_norm_backward", mutates_args=())
def _backward_op(grad_x1: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                 gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_gated_residual_norm_backward(grad_x1, grad_out, x, a, gate, shift, scale, eps)


@_backward_op.register_fake
def _(grad_x1, grad_out, x, a, gate, shift, scale, eps):
    return (torch.empty_like(x), torch.empty_like(a), torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(shift, memory_format=torch.contiguous_format),
            torch.empty_like(scale, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    x, a, gate, shift, scale, eps = inputs
    ctx.save_for_backward(x, a, gate, shift, scale)
    ctx.eps = eps


def _backward(ctx, grad_x1: torch.Tensor | None, grad_out: torch.Tensor | None):
    x, a, gate, shift, scale = ctx.saved_tensors
    grad_x1 = torch.zeros_like(x) if grad_x1 is None else grad_x1
    grad_out = torch.zeros_like(x) if grad_out is None else grad_out
    return (*_backward_op(grad_x1, grad_out, x, a, gate, shift, scale, ctx.eps), None)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _rows(x: torch.Tensor) -> tuple[int, int, int, tuple[int, int]]:
    b, length, dim = x.shape
    return b, length, dim, (triton.cdiv(length, ROWS_PER_PROGRAM), b)


def _unit_stride(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (B, 1, C) modulation rows with unit stride along C, as the kernels index them."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in rows)


def triton_gated_residual_norm(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel: x1 and the normalised, modulated x1, (B, L, C) contiguous each."""
    x, a = x.contiguous(), a.contiguous()
    gate, shift, scale = _unit_stride(gate, shift, scale)
    b, length, dim, grid = _rows(x)
    x1_dtype, out_dtype = _out_dtypes(x, a, gate, shift, scale)
    x1 = torch.empty(x.shape, dtype=x1_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _gated_residual_norm_forward[grid](x, a, gate, shift, scale, x1, out, length, dim, gate.stride(0),
                                       shift.stride(0), scale.stride(0), eps, BLOCK_C=triton.next_power_of_2(dim),
                                       ROWS=ROWS_PER_STEP, ROWS_PER_PROGRAM=ROWS_PER_PROGRAM, num_warps=NUM_WARPS)
    return x1, out


def triton_gated_residual_norm_backward(grad_x1: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
                                        a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                        eps: float) -> tuple[torch.Tensor, ...]:
    """The backward kernel, given the gradients of x1 (from the rest of the trunk) and of the
    normalised output: the gradients of x, a, gate, shift and scale, in that order."""
    x, a, grad_x1, grad_out = x.contiguous(), a.contiguous(), grad_x1.contiguous(), grad_out.contiguous()
    gate, shift, scale = _unit_stride(gate, shift, scale)
    b, length, dim, grid = _rows(x)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_a = torch.empty_like(a, memory_format=torch.contiguous_format)
    partial = torch.empty(3, b, grid[0], dim, dtype=torch.float32, device=x.device)  # gate, shift, scale
    _gated_residual_norm_backward[grid](grad_x1, grad_out, x, a, gate, shift, scale, grad_x, grad_a, partial, length,
                                        dim, gate.stride(0), shift.stride(0), scale.stride(0), eps,
                                        X1_DTYPE=_TRITON_DTYPES[_out_dtypes(x, a, gate, shift, scale)[0]],
                                        BLOCK_C=triton.next_power_of_2(dim), ROWS=ROWS_PER_STEP,
                                        ROWS_PER_PROGRAM=ROWS_PER_PROGRAM, num_warps=NUM_WARPS)
    sums = (part.sum(1, keepdim=True).to(t.dtype) for part, t in zip(partial, (gate, shift, scale)))  # (B, 1, C) each
    return grad_x, grad_a, *sums


if triton is not None:
    @triton.jit
    def _program_rows(Gate, Shift, Scale, length, dim, stride_gate, stride_shift, stride_scale,
                      BLOCK_C: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
        """This program's sample b, its positions [start, stop), the columns and their validity, and the
        sample's 1 + gate, shift and 1 + scale rows (float32)."""
        b = tl.program_id(1)
        start = tl.program_id(0) * ROWS_PER_PROGRAM
        stop = tl.minimum(start + ROWS_PER_PROGRAM, length)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < dim
        gate = tl.load(Gate + b * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
        shift = tl.load(Shift + b * stride_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
        scale = tl.load(Scale + b * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
        return b, start, stop, cols, col_ok, 1 + gate, shift, 1 + scale

    @triton.jit
    def _residual_rows(X, A, one_gate, offsets, m, dim, eps, X1_DTYPE: tl.constexpr):
        """x1 = x + (1 + gate) * a rounded to x1's dtype, the rows' 1 / rms and the normalised rows,
        rounded as the plain path rounds them (all float32)."""
        x = tl.load(X + offsets, mask=m, other=0.0).to(tl.float32)
        a = tl.load(A + offsets, mask=m, other=0.0).to(tl.float32)
        x1 = (x + one_gate[None, :] * a).to(X1_DTYPE).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x1 * x1, 1) / dim + eps)
        normed = (x1 * rstd[:, None]).to(X1_DTYPE).to(tl.float32)
        return a, x1, rstd, normed

    @triton.jit
    def _row_block(b, start, stop, length, dim, cols, col_ok, ROWS: tl.constexpr):
        """Offsets and mask of rows [start, start + ROWS) of sample b in (B, L, C) contiguous tensors."""
        rows = start + tl.arange(0, ROWS)
        offsets = (b.to(tl.int64) * length + rows)[:, None] * dim + cols[None, :]
        return offsets, (rows < stop)[:, None] & col_ok[None, :]

    @triton.jit
    def _gated_residual_norm_forward(X, A, Gate, Shift, Scale, X1, Out, length, dim, stride_gate, stride_shift,
                                     stride_scale, eps, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                                     ROWS_PER_PROGRAM: tl.constexpr):
        b, start, stop, cols, col_ok, one_gate, shift, one_scale = _program_rows(
            Gate, Shift, Scale, length, dim, stride_gate, stride_shift, stride_scale, BLOCK_C, ROWS_PER_PROGRAM)
        for row in range(start, stop, ROWS):
            offsets, m = _row_block(b, row, stop, length, dim, cols, col_ok, ROWS)
            a, x1, rstd, normed = _residual_rows(X, A, one_gate, offsets, m, dim, eps, X1.dtype.element_ty)
            tl.store(X1 + offsets, x1.to(X1.dtype.element_ty), mask=m)
            tl.store(Out + offsets, (normed * one_scale[None, :] + shift[None, :]).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def _gated_residual_norm_backward(GradX1, GradOut, X, A, Gate, Shift, Scale, GradX, GradA, Partial, length, dim,
                                      stride_gate, stride_shift, stride_scale, eps, X1_DTYPE: tl.constexpr,
                                      BLOCK_C: tl.constexpr, ROWS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
        b, start, stop, cols, col_ok, one_gate, shift, one_scale = _program_rows(
            Gate, Shift, Scale, length, dim, stride_gate, stride_shift, stride_scale, BLOCK_C, ROWS_PER_PROGRAM)
        sum_gate = tl.zeros([BLOCK_C], tl.float32)
        sum_shift = tl.zeros([BLOCK_C], tl.float32)
        sum_scale = tl.zeros([BLOCK_C], tl.float32)
        for row in range(start, stop, ROWS):
            offsets, m = _row_block(b, row, stop, length, dim, cols, col_ok, ROWS)
            a, x1, rstd, normed = _residual_rows(X, A, one_gate, offsets, m, dim, eps, X1_DTYPE)
            grad_out = tl.load(GradOut + offsets, mask=m, other=0.0).to(tl.float32)
            sum_shift += tl.sum(grad_out, 0)
            sum_scale += tl.sum(grad_out * normed, 0)
            grad_normed = grad_out * one_scale[None, :]
            mean = tl.sum(grad_normed * normed, 1) / dim
            grad = tl.load(GradX1 + offsets, mask=m, other=0.0).to(tl.float32)
            grad += rstd[:, None] * (grad_normed - normed * mean[:, None])
            sum_gate += tl.sum(grad * a, 0)
            tl.store(GradX + offsets, grad.to(GradX.dtype.element_ty), mask=m)
            tl.store(GradA + offsets, (grad * one_gate[None, :]).to(GradA.dtype.element_ty), mask=m)
        slot = (b.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * dim + cols
        stride = tl.num_programs(1).to(tl.int64) * tl.num_programs(0) * dim
        tl.store(Partial + slot, sum_gate, mask=col_ok)
        tl.store(Partial + stride + slot, sum_shift, mask=col_ok)
        tl.store(Partial + 2 * stride + slot, sum_scale, mask=col_ok)
