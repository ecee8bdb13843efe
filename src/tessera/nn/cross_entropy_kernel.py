"""One chunk of the fused linear cross-entropy's terms and logit gradient as a Triton kernel.

The PyTorch chunk step (nn/fused_cross_entropy.py) upcasts the chunk's logits to float32 and makes
about ten passes over them (log-softmax, argmax, exp, scaling, casts). This kernel reads each row of
the logits as the matrix product wrote them (bf16 under autocast) twice: once for the running max
and sum of exponentials (log Z), the argmax, the target's logit and the logits' sum (label
smoothing), once to write the gradient of sum(row_weight * (CE + z_loss * log Z^2)) over the logits
in their own memory and dtype. Arithmetic is float32; the gradient is rounded once, to the logits'
dtype, as the PyTorch path rounds it once for the products that follow.

With TRITON_INTERPRET=1 set before import (tests), the kernel runs in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import torch

from .decode_attention import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch chunk step serves
    triton = None

MAX_BLOCK = 4096  # vocabulary columns per loop step


def cross_entropy_kernel_runs(logits: torch.Tensor) -> bool:
    """Whether `triton_cross_entropy_terms` runs for these (N, V) logits."""
    return triton_available(logits.device) and logits.dim() == 2 and logits.stride(-1) == 1


def triton_cross_entropy_terms(logits: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                               smoothing: float, z_loss: float) -> tuple[torch.Tensor, ...]:
    """Per-row CE and log Z^2 (float32), the number of rows whose argmax is the target, and the
    gradient of sum(row_weight * (CE + z_loss * log Z^2)) with respect to the (N, V) logits,
    written over `logits` (returned; the logits are gone afterwards)."""
    n, vocab = logits.shape
    if target.shape != (n,) or row_weight.shape != (n,):
        raise ValueError(f"targets and row weights of shape ({n},) expected, got {tuple(target.shape)} "
                         f"and {tuple(row_weight.shape)}")
    ce = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(ce)
    hit = torch.empty(n, dtype=torch.int32, device=logits.device)
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK)
    _cross_entropy_rows[(n,)](logits, logits.stride(0), target.contiguous(), row_weight.float().contiguous(), ce, lse,
                              hit, vocab, float(smoothing), float(z_loss), BLOCK=block)
    return ce, lse * lse, hit.sum(), logits


if triton is not None:
    @triton.jit
    def _cross_entropy_rows(Logits, stride_row, Target, RowWeight, CE, LSE, Hit, vocab, smoothing, z_loss,
                            BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = Logits + pid.to(tl.int64) * stride_row
        target = tl.load(Target + pid)
        weight = tl.load(RowWeight + pid)
        running_max = -float("inf")
        exp_sum = 0.0
        logit_sum = 0.0
        target_logit = 0.0
        best = -float("inf")
        best_col = 0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < vocab
            x = tl.load(row + cols, mask=valid, other=-float("inf")).to(tl.float32)
            block_max = tl.max(x, 0)
            new_max = tl.maximum(running_max, block_max)
            exp_sum = exp_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
            logit_sum += tl.sum(tl.where(valid, x, 0.0), 0)
            target_logit += tl.sum(tl.where(cols == target, x, 0.0), 0)
            block_col = start + tl.argmax(x, 0)  # the first maximum, as torch.argmax
            best_col = tl.where(block_max > best, block_col, best_col)
            best = tl.maximum(best, block_max)
        lse = running_max + tl.log(exp_sum)
        nll = lse - target_logit
        tl.store(CE + pid, (1.0 - smoothing) * nll - smoothing * (logit_sum / vocab - lse))
        tl.store(LSE + pid, lse)
        tl.store(Hit + pid, (best_col == target).to(tl.int32))
        scale = weight * (1.0 + 2.0 * z_loss * lse)
        floor = smoothing / vocab * weight
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < vocab
            x = tl.load(row + cols, mask=valid, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * scale - floor - tl.where(cols == target, (1.0 - smoothing) * weight, 0.0)
            tl.store(row + cols, grad.to(Logits.dtype.element_ty), mask=valid)
