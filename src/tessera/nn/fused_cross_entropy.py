"""Linear layer + cross-entropy without materialising the logits (the liger-kernel idea, in PyTorch).

The rows are processed `chunk` at a time: each chunk's float32 logits give its loss terms and,
at once, the gradients with respect to the features and the weight. Only those gradients are
kept for backward, so peak memory holds one chunk of logits (chunk x V) instead of N x V; for
LlamaGen's 16,384-code vocabulary at 256 tokens x batch 256 that is 4.3 GB of float32 logits
avoided. Matches `F.cross_entropy(h @ W.T, ...)` with label smoothing and z-loss (parity test).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch

from .cross_entropy_kernel import cross_entropy_kernel_runs, triton_cross_entropy_terms
from .layers import autocast_dtype

LossKernel = Literal["torch", "compiled", "triton", "liger"]
LOSS_KERNELS: tuple[str, ...] = ("torch", "compiled", "triton", "liger")


def _chunk_terms(logits: torch.Tensor, target: torch.Tensor, smoothing: float, z_loss: float,
                 row_weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row CE and log Z^2 of one chunk's (N, V) logits, its correct count, and the gradient of
    sum(row_weight * (CE + z_loss * log Z^2)) with respect to the logits (float32).

    Written for few passes over the chunk's float32 logits: one log-softmax, log Z from the target's
    column (its logit minus its log-probability), the terms of label smoothing and z-loss only when
    they are on, and the gradient built in place in the log-probabilities' memory."""
    logits = logits.float()
    correct = (logits.argmax(-1) == target).sum()
    column = target[:, None]
    log_probs = torch.log_softmax(logits, -1)
    target_log_prob = log_probs.gather(-1, column)[:, 0]
    lse = logits.gather(-1, column)[:, 0] - target_log_prob
    ce = -target_log_prob
    if smoothing:
        ce = (1 - smoothing) * ce - smoothing * log_probs.mean(-1)
    scale = row_weight * (1 + 2 * z_loss * lse) if z_loss else row_weight
    grad = log_probs.exp_().mul_(scale[:, None])  # softmax, times each row's weight (and z-loss factor)
    if smoothing:
        grad.sub_((smoothing / logits.shape[-1]) * row_weight[:, None])
    grad.scatter_add_(-1, column, (-(1 - smoothing) * row_weight)[:, None])
    return ce, lse.pow(2), correct, grad


def _triton_chunk_terms(logits: torch.Tensor, target: torch.Tensor, smoothing: float, z_loss: float,
                        row_weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`_chunk_terms` by nn/cross_entropy_kernel.py's Triton kernel over the logits as the product
    wrote them; the PyTorch terms where the kernel does not run."""
    if not cross_entropy_kernel_runs(logits):
        return _chunk_terms(logits, target, smoothing, z_loss, row_weight)
    return triton_cross_entropy_terms(logits, target, row_weight, smoothing, z_loss)


def _chunk_step(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, smoothing: float, z_loss: float,
                row_weight: torch.Tensor, want_h: bool, want_w: bool,
                terms: Callable[..., tuple[torch.Tensor, ...]] = _chunk_terms) -> tuple[torch.Tensor | None, ...]:
    """`terms` (`_chunk_terms` or its Triton kernel) of one chunk and what it adds to the gradients:
    the chunk's rows of the features' gradient (in h's dtype; if `want_h`) and its term of the
    weight's gradient (float32; if `want_w`). The logits' gradient is cast once, to the dtype the
    matrix products run in (autocast's, else the weight's)."""
    ce, lse_sq, correct, grad = terms(h @ weight.t(), target, smoothing, z_loss, row_weight)
    grad = grad.to(autocast_dtype(h.device.type) or weight.dtype)
    grad_h = (grad @ weight).to(h.dtype) if want_h else None
    grad_w = (grad.t() @ h.to(grad.dtype)).float() if want_w else None
    return ce, lse_sq, correct, grad_h, grad_w


@functools.cache
def _compiled_chunk_step() -> Callable[..., tuple[torch.Tensor, ...]]:
    """`_chunk_step` compiled by Inductor: the chunk's float32 logits are read in a few fused passes
    instead of one pass per op (logsumexp, log-softmax, gather, mean, exp, gradient, argmax, cast)."""
    return torch.compile(_chunk_step, dynamic=False)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, row_weight, smoothing, z_loss, chunk, kernel):  # noqa: D401
        n = h.shape[0]
        if kernel == "compiled":
            step = _compiled_chunk_step()
        elif kernel == "triton":
            step = functools.partial(_chunk_step, terms=_triton_chunk_terms)
        else:
            step = _chunk_step
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        ce = torch.empty(n, dtype=torch.float32, device=h.device)
        zl = torch.empty_like(ce)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            ce[rows], zl[rows], c_correct, h_rows, w_term = step(h[rows], weight, target[rows], smoothing, z_loss,
                                                                 row_weight[rows], grad_h is not None,
                                                                 grad_w is not None)
            correct = correct + c_correct
            if grad_h is not None:
                grad_h[rows] = h_rows
            if grad_w is not None:
                grad_w += w_term
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.mark_non_differentiable(ce, zl, correct)
        return (row_weight * (ce + z_loss * zl)).sum(), ce, zl, correct

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None, None, None, None, None, None,
                None)


def _liger_rows(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weighted_linear_cross_entropy` through liger-kernel's Triton kernel (its own chunking)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        raise ImportError("loss_kernel=liger needs liger-kernel: pip install 'tessera[liger]'") from None
    out = liger_fused_linear_cross_entropy(h, weight, target, lse_square_scale=z_loss, label_smoothing=smoothing,
                                           reduction="none", return_z_loss=True, return_token_accuracy=True)
    z_term = out.z_loss.detach().float()  # z_loss * log Z^2 per row
    lse_sq = z_term / z_loss if z_loss > 0 else torch.zeros_like(z_term)
    return ((out.loss.float() * row_weight).sum(), out.loss.detach().float() - z_term, lse_sq,
            out.token_accuracy.detach().sum().long())


def weighted_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                  row_weight: torch.Tensor, label_smoothing: float = 0.0, z_loss: float = 0.0,
                                  chunk: int = 4096, kernel: LossKernel = "torch"
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i row_weight_i * (CE_i + z_loss * log Z_i^2) of logits `h @ weight.T` for features h (N, d),
    targets (N,) and row weights (N,), `chunk` rows at a time (`kernel="torch"`; `"compiled"`: each
    chunk's step compiled by Inductor; `"triton"`: each chunk's terms by nn/cross_entropy_kernel.py,
    where Triton runs) or by liger-kernel's Triton kernel (`"liger"`); also each row's CE and
    log Z^2 (detached, for logging) and the number of rows whose argmax is the target."""
    if h.dim() != 2 or target.shape != h.shape[:1] or row_weight.shape != h.shape[:1]:
        raise ValueError(f"features (N, d), targets (N,) and row weights (N,) expected, got {tuple(h.shape)}, "
                         f"{tuple(target.shape)} and {tuple(row_weight.shape)}")
    if kernel == "liger":
        return _liger_rows(h, weight, target, row_weight.float(), label_smoothing, z_loss)
    return _FusedLinearCrossEntropy.apply(h, weight, target, row_weight.float(), label_smoothing, z_loss,
                                          max(chunk, 1), kernel)


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               label_smoothing: float = 0.0, z_loss: float = 0.0, chunk: int = 4096,
                               kernel: LossKernel = "torch") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE (+ z_loss * mean log Z^2) of logits `h @ weight.T` for features h (N, d) and targets (N,),
    `chunk` rows at a time; also the CE alone, the z-term and the accuracy (as `token_cross_entropy`)."""
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"features (N, d) and targets (N,) expected, got {tuple(h.shape)} and {tuple(target.shape)}")
    n = max(h.shape[0], 1)
    uniform = torch.full(h.shape[:1], 1.0 / n, dtype=torch.float32, device=h.device)
    loss, ce, zl, correct = weighted_linear_cross_entropy(h, weight, target, uniform, label_smoothing, z_loss, chunk,
                                                          kernel)
    logs = {"ce": ce.mean(), "acc": correct.float() / n}
    if z_loss > 0:
        logs["z_loss"] = zl.mean()
    return loss, logs
