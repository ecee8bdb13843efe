"""The SwiGLU activation silu(gate) * up of a packed (..., 2 * hidden) projection, forward and backward.

Compiled by Inductor, the backward writes the packed gradient [d_gate, d_up] as one pass over the
(..., 2 * hidden) output whose every element loads from both halves of its inputs and evaluates the
sigmoid: on VAR-d16 (batch 96, H100, bf16) 0.79 ms per block, about 1.5x its memory traffic. The
Triton kernels here read each (gate, up, grad) triple once and write both gradient halves from it.
Intermediates stay in float32 (no rounding of silu(gate) to the input's dtype before the product).

On CUDA it runs as the custom op `tessera::swiglu` (opaque to torch.compile, with its autograd
formula registered); elsewhere the reference runs. With TRITON_INTERPRET=1 set before import
(tests), the kernels run in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .decode_attention import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

BLOCK = 512  # columns per program


def swiglu_reference(h13: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the (..., 2 * hidden) tensor [gate, up], as PyTorch ops."""
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(h13: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """silu(gate) * up of the (..., 2 * hidden) tensor [gate, up] -> (..., hidden); the Triton
    kernels where they run and `fused` is set, else the reference."""
    if h13.shape[-1] % 2:
        raise ValueError(f"swiglu wants a (..., 2 * hidden) input; its last dimension is {h13.shape[-1]}")
    if not fused or not triton_available(h13.device) or h13.numel() == 0:
        return swiglu_reference(h13)
    return _fused_op(h13)


@torch.library.custom_op("tessera::swiglu", mutates_args=())
def _fused_op(h13: torch.Tensor) -> torch.Tensor:
    return triton_swiglu(h13)


@_fused_op.register_fake
def _(h13: torch.Tensor) -> torch.Tensor:
    return h13.new_empty(*h13.shape[:-1], h13.shape[-1] // 2)


@torch.library.custom_op("tessera::swiglu_backward", mutates_args=())
def _fused_backward_op(grad: torch.Tensor, h13: torch.Tensor) -> torch.Tensor:
    return triton_swiglu_backward(grad, h13)


@_fused_backward_op.register_fake
def _(grad: torch.Tensor, h13: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h13, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return _fused_backward_op(grad, *ctx.saved_tensors)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a (rows, columns) matrix with unit column stride (a view where possible)."""
    return t.reshape(-1, t.shape[-1]) if t.stride(-1) == 1 else t.contiguous().reshape(-1, t.shape[-1])


def _grid(rows: int, hidden: int) -> tuple[int, int]:
    return rows, triton.cdiv(hidden, BLOCK)


def triton_swiglu(h13: torch.Tensor) -> torch.Tensor:
    """The forward kernel: one program per row and BLOCK columns of the output."""
    packed = _rows(h13)
    hidden = packed.shape[1] // 2
    out = torch.empty(packed.shape[0], hidden, dtype=h13.dtype, device=h13.device)
    _swiglu_forward[_grid(*out.shape)](packed, out, hidden, packed.stride(0), BLOCK=BLOCK)
    return out.view(*h13.shape[:-1], hidden)


def triton_swiglu_backward(grad: torch.Tensor, h13: torch.Tensor) -> torch.Tensor:
    """The backward kernel: the gradient of the packed input, [d_gate, d_up], contiguous."""
    packed, g = _rows(h13), _rows(grad)
    hidden = packed.shape[1] // 2
    if g.shape != (packed.shape[0], hidden):
        raise ValueError(f"swiglu's gradient has shape {tuple(grad.shape)}; {(*h13.shape[:-1], hidden)} expected")
    grad_h13 = torch.empty(packed.shape, dtype=h13.dtype, device=h13.device)
    _swiglu_backward[_grid(packed.shape[0], hidden)](g, packed, grad_h13, hidden, g.stride(0), packed.stride(0),
                                                     BLOCK=BLOCK)
    return grad_h13.view(h13.shape)


if triton is not None:
    @triton.jit
    def _swiglu_forward(H, Out, hidden, stride_h, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < hidden
        gate = tl.load(H + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(H + row * stride_h + hidden + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Out + row * hidden + cols, (gate * tl.sigmoid(gate) * up).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_backward(G, H, GradH, hidden, stride_g, stride_h, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < hidden
        g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(H + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(H + row * stride_h + hidden + cols, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        out = GradH + row * (2 * hidden) + cols
        tl.store(out, d_gate.to(GradH.dtype.element_ty), mask=m)
        tl.store(out + hidden, (g * gate * sig).to(GradH.dtype.element_ty), mask=m)
