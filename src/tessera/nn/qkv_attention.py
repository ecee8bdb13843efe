"""QK-norm, RoPE and prefix attention from the packed QKV projection, as one autograd op.

Run as their parts (`rms_norm_rope` on q and k, then `prefix_attention`), the backward leaves
dQ, dK and dV in three tensors, which autograd stacks and copies into the (B, L, 3, H, D)
gradient of the QKV projection's output: 4.2 ms of a 219 ms VAR-d16 training step at batch 96 on
an H100 (bench/train_step_profile.py). Here the attention backward writes dQ, dK and dV straight
into slices of that one packed gradient, and the QK-norm + RoPE backward turns dQ and dK into the
gradients of the raw q and k in place. The same kernels run as in the parts, so values and
gradients are theirs.

On CUDA it runs as the custom op `tessera::qkv_prefix_attention` (opaque to torch.compile, its
autograd registered). With TRITON_INTERPRET=1 set before import (tests), the kernels run in
Triton's CPU interpreter on CPU tensors.
"""
from __future__ import annotations

import torch

from .prefix_attention import (PrefixMask, empty_rows_major, prefix_attention_supported,
                               triton_prefix_attention, triton_prefix_attention_backward)
from .qk_norm_rope import triton_rms_norm_rope, triton_rms_norm_rope_backward


def qkv_prefix_attention_supported(qkv: torch.Tensor) -> bool:
    """Whether the fused op runs for this (B, L, 3, H, D) projection output (the prefix kernels'
    conditions; their head sizes are powers of two, as the QK-norm + RoPE kernels need)."""
    return qkv.dim() == 5 and qkv.shape[2] == 3 and prefix_attention_supported(qkv)


def qkv_prefix_attention(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, eps: float, mask: PrefixMask) -> torch.Tensor:
    """qkv (B, L, 3, H, D) -> attention output (B, H, L, D) under the prefix mask, with q and k
    RMS-normalised (gains `q_weight`, `k_weight`) and rotated by the (L, D/2) tables first."""
    if q_weight.shape != qkv.shape[-1:] or k_weight.shape != qkv.shape[-1:]:
        raise ValueError(f"the norm weights have shapes {tuple(q_weight.shape)}, {tuple(k_weight.shape)}; "
                         f"({qkv.shape[-1]},) expected")
    out, _, _, _ = _forward_op(qkv, q_weight, k_weight, cos, sin, mask.kv_end, mask.first_rows, eps)
    return out


def _heads(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v as (B, H, L, D) views of a (B, L, 3, H, D) tensor."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("tessera::qkv_prefix_attention", mutates_args=())
def _forward_op(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, kv_end: torch.Tensor, first_rows: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q_raw, k_raw, v = _heads(qkv)
    q = triton_rms_norm_rope(q_raw, q_weight, cos, sin, eps)
    k = triton_rms_norm_rope(k_raw, k_weight, cos, sin, eps)
    out, lse = triton_prefix_attention(q, k, v, kv_end)
    return out, q, k, lse


@_forward_op.register_fake
def _(qkv, q_weight, k_weight, cos, sin, kv_end, first_rows, eps):
    q_raw = _heads(qkv)[0]
    b, h, length, _ = q_raw.shape
    return (empty_rows_major(q_raw), empty_rows_major(q_raw), empty_rows_major(q_raw),
            qkv.new_empty(b, h, length, dtype=torch.float32))


@torch.library.custom_op("tessera::qkv_prefix_attention_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, kv_end: torch.Tensor, first_rows: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_raw, k_raw, v = _heads(qkv)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    grad_q, grad_k, grad_v = _heads(grad_qkv)
    triton_prefix_attention_backward(grad, q, k, v, out, lse, kv_end, first_rows, grads=(grad_q, grad_k, grad_v))
    _, grad_q_weight = triton_rms_norm_rope_backward(grad_q, q_raw, q_weight, cos, sin, eps, grad_x=grad_q)
    _, grad_k_weight = triton_rms_norm_rope_backward(grad_k, k_raw, k_weight, cos, sin, eps, grad_x=grad_k)
    return grad_qkv, grad_q_weight, grad_k_weight


@_backward_op.register_fake
def _(grad, qkv, q, k, out, lse, q_weight, k_weight, cos, sin, kv_end, first_rows, eps):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(q_weight), \
        torch.empty_like(k_weight)


def _setup_context(ctx, inputs, output) -> None:
    qkv, q_weight, k_weight, cos, sin, kv_end, first_rows, eps = inputs
    out, q, k, lse = output
    ctx.save_for_backward(qkv, q, k, out, lse, q_weight, k_weight, cos, sin, kv_end, first_rows)
    ctx.mark_non_differentiable(q, k, lse)
    ctx.eps = eps


def _backward(ctx, grad_out: torch.Tensor, *unused: torch.Tensor | None):
    grad_qkv, grad_q_weight, grad_k_weight = _backward_op(grad_out, *ctx.saved_tensors, ctx.eps)
    return grad_qkv, grad_q_weight, grad_k_weight, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
