"""One attention entry point with explicit backends: sdpa, flex, triton, xformers, math, and auto.

The backend is chosen in config and logged. `auto` picks per mask kind from measurements on an
H100 (bf16, forward + backward, issue 6): cuDNN SDPA was fastest for causal and full attention;
compiled FlexAttention with a cached block mask won for window+sink (1.94 ms against 7.58 ms for
SDPA at 8,192 tokens); for VAR's block-causal mask the `triton` backend's prefix-mask kernels
(`prefix_attention`) took 0.77 ms at 680 tokens against 1.6-1.8 ms for cuDNN with a dense mask
(the fastest of PyTorch's kernels there, ahead of FlexAttention). So: FlexAttention for window+sink
on CUDA, the prefix kernels for the AUTO_TRITON kinds where Triton runs, SDPA otherwise (MAGNeT's
band mask was not measured and stays on SDPA). The `triton` backend runs block-causal and causal
full sequences on the prefix kernels and every other case (KV-cached decoding included) as sdpa.

A mask is prepared once per forward pass (`prepare_mask`) and reused by every layer. One case
takes a dedicated kernel under the sdpa, flex and triton backends: a single causal query against a KV
cache (incremental decoding) on a device where Triton runs goes to `decode_attention`, which
reads only the cache slots written so far.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .decode_attention import decode_attention, triton_available
from .masks import AttentionMask
from .prefix_attention import PrefixMask, prefix_attention

Backend = Literal["auto", "sdpa", "flex", "triton", "xformers", "math"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex", "triton", "xformers", "math")
FLEX_FASTEST = frozenset({"window_sink"})  # mask kinds for which `auto` picks FlexAttention on CUDA
AUTO_TRITON = frozenset({"block_causal"})  # mask kinds for which `auto` picks the prefix kernels where Triton runs
logger = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (with the reason)."""


@dataclass
class QueryGroup:
    """Queries [start, end) attend to keys [0, kv_end): everywhere, or under `dense` (end - start, kv_end)."""

    start: int
    end: int
    kv_end: int
    dense: torch.Tensor | None = None


@dataclass
class PreparedMask:
    """A mask in the form one backend consumes."""

    backend: str
    is_causal: bool = False
    dense: torch.Tensor | None = None  # bool (Lq, Lk); None means attend everywhere
    block_mask: Any = None  # FlexAttention BlockMask
    decode_length: torch.Tensor | None = None  # (1,): one causal query over cache slots [0, length)
    groups: list[QueryGroup] | None = None  # block-causal as one SDPA call per group of query rows
    prefix: PrefixMask | None = None  # block-causal or causal for the prefix-mask kernels


def prepare_mask(mask: AttentionMask, q_pos: torch.Tensor, kv_pos: torch.Tensor, backend: str,
                 full_sequence: bool, group_rows: int = 0) -> PreparedMask:
    """Turn an AttentionMask at the given absolute positions into the backend's input.

    `full_sequence` says q_pos == kv_pos == arange(L) (no cache), which lets sdpa use its
    fused causal path and skip a dense mask. `group_rows` > 0 runs a block-causal full sequence
    under sdpa as query groups of at least that many rows (see `query_groups`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    backend = resolve_backend(backend, mask.kind, q_pos.device.type)
    if _is_causal_decode(mask, q_pos, backend, full_sequence):
        return PreparedMask(backend, decode_length=q_pos + 1)
    if backend == "flex":
        if full_sequence and mask.block_ids is None:  # the same mask every training step: build it once
            return PreparedMask(backend, block_mask=_full_block_mask(mask.kind, mask.window, mask.n_sink,
                                                                     q_pos.numel(), str(q_pos.device)))
        return PreparedMask(backend, block_mask=_flex_block_mask(mask, q_pos, kv_pos))
    if mask.kind == "bidirectional" and full_sequence:
        return PreparedMask(backend)
    if backend == "triton" and full_sequence and (mask.kind == "causal" or mask.block_sizes is not None):
        return PreparedMask(backend, prefix=_prefix_mask(mask.block_sizes, q_pos.numel(), str(q_pos.device)))
    if backend == "triton":  # cached decoding and other masks: as sdpa
        backend = "sdpa"
    if mask.kind == "causal" and full_sequence and backend == "sdpa":
        return PreparedMask(backend, is_causal=True)
    if (group_rows > 0 and mask.kind == "block_causal" and full_sequence and backend == "sdpa"
            and mask.block_sizes is not None):
        groups = query_groups(mask, q_pos.device, group_rows)
        if len(groups) > 1:
            return PreparedMask(backend, groups=groups)
    return PreparedMask(backend, dense=mask.to(q_pos.device).dense(q_pos, kv_pos))


def prefix_spans(block_sizes: tuple[int, ...], min_rows: int) -> list[tuple[int, int, int]]:
    """Consecutive blocks merged into (start, end, blocks) spans of at least `min_rows` rows (the
    last span may be shorter): a span's rows see keys [0, end), masked only if it holds several blocks."""
    spans, start, end, blocks = [], 0, 0, 0
    for size in block_sizes:
        end, blocks = end + size, blocks + 1
        if end - start >= min_rows:
            spans.append((start, end, blocks))
            start, blocks = end, 0
    if blocks:
        spans.append((start, end, blocks))
    return spans


def query_groups(mask: AttentionMask, device: torch.device, min_rows: int) -> list[QueryGroup]:
    """A block-causal mask over a full sequence as query groups: each block of at least `min_rows`
    rows attends, unmasked, to the prefix of keys up to its end; smaller blocks merge with the
    blocks after them under a dense mask. Keys past a group's end, never visible, are not computed."""
    rule, groups = mask.to(device), []
    for start, end, blocks in prefix_spans(mask.block_sizes, min_rows):
        dense = None
        if blocks > 1:
            dense = rule.dense(torch.arange(start, end, device=device), torch.arange(end, device=device))
        groups.append(QueryGroup(start, end, end, dense))
    return groups


def resolve_backend(backend: str, mask_kind: str, device_type: str) -> str:
    """The backend that runs a mask of `mask_kind`: `backend` itself unless it is `auto`."""
    if backend != "auto":
        return backend
    choice = "sdpa"
    if mask_kind in FLEX_FASTEST and device_type == "cuda":
        choice = "flex"
    elif mask_kind in AUTO_TRITON and triton_available(torch.device(device_type)):
        choice = "triton"
    if not torch.compiler.is_compiling():  # logging would break a compiled graph
        _log_choice(mask_kind, device_type, choice)
    return choice


def auto_summary(device_type: str) -> str:
    """What `auto` runs on this device type, for logs."""
    parts = [f"{kind}: flex" for kind in sorted(FLEX_FASTEST) if device_type == "cuda"]
    parts += [f"{kind}: triton" for kind in sorted(AUTO_TRITON) if triton_available(torch.device(device_type))]
    return "; ".join(parts + ["others: sdpa"]) if parts else "sdpa"


@functools.cache
def _log_choice(mask_kind: str, device_type: str, choice: str) -> None:
    logger.info("attention=auto: %s mask on %s runs on %s", mask_kind, device_type, choice)


def _is_causal_decode(mask: AttentionMask, q_pos: torch.Tensor, backend: str, full_sequence: bool) -> bool:
    """One causal query against a KV cache, on a device where the decode kernel runs (sdpa, flex
    and triton backends; `math` stays the plain reference)."""
    return (not full_sequence and mask.kind == "causal" and q_pos.numel() == 1
            and backend in ("sdpa", "flex", "triton") and triton_available(q_pos.device))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: PreparedMask) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, L, D) tensors with a prepared mask."""
    if prepared.decode_length is not None:
        return decode_attention(q, k, v, prepared.decode_length)
    if prepared.prefix is not None:
        return prefix_attention(q, k, v, prepared.prefix)
    if prepared.groups is not None:
        return torch.cat([F.scaled_dot_product_attention(q[:, :, g.start:g.end], k[:, :, :g.kv_end], v[:, :, :g.kv_end],
                                                         attn_mask=g.dense) for g in prepared.groups], dim=2)
    if prepared.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared.dense, is_causal=prepared.is_causal)
    if prepared.backend == "flex":
        return _flex_attention(q.device.type)(q, k, v, block_mask=prepared.block_mask)
    if prepared.backend == "xformers":
        return _xformers_attention(q, k, v, prepared.dense)
    return math_attention(q, k, v, prepared.dense)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax(QK^T / sqrt(d)) V in the inputs' dtype: the reference for every backend."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if dense is not None:
        scores = scores.masked_fill(~dense, float("-inf"))
    return scores.softmax(dim=-1) @ v


@functools.lru_cache(maxsize=16)
def _prefix_mask(block_sizes: tuple[int, ...] | None, length: int, device: str) -> PrefixMask:
    """Block-causal over `block_sizes`, or causal over `length` (None), built (and checked, on the
    host) once per layout and device."""
    return PrefixMask.causal(length, device) if block_sizes is None else PrefixMask.block_causal(block_sizes, device)


# ----- FlexAttention ---------------------------------------------------------------------------
@functools.cache
def _flex_attention(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    # Compiled on GPU (where FlexAttention is fast); the eager reference path on CPU.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _flex_block_mask(mask: AttentionMask, q_pos: torch.Tensor, kv_pos: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask
    rule = mask.to(q_pos.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return rule.allowed(q_pos[q_idx], kv_pos[kv_idx])

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_pos.numel(), KV_LEN=kv_pos.numel(),
                             device=q_pos.device)


@functools.lru_cache(maxsize=16)
def _full_block_mask(kind: str, window: int, n_sink: int, length: int, device: str):
    positions = torch.arange(length, device=device)
    return _flex_block_mask(AttentionMask(kind, window=window, n_sink=n_sink), positions, positions)


# ----- xformers ---------------------------------------------------------------------------------
@functools.cache
def check_xformers(device_type: str) -> None:
    """Raise BackendUnavailable naming why xformers' kernels cannot run on this device."""
    try:
        import xformers.ops as xops
    except Exception as err:  # ImportError or a broken build
        raise BackendUnavailable(f"attention backend 'xformers' is unavailable: cannot import xformers ({err}); "
                                 f"install tessera[xformers] on a CUDA machine or use backend 'sdpa'") from None
    q = torch.zeros(1, 8, 1, 8, device=device_type)
    try:
        xops.memory_efficient_attention(q, q, q)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendUnavailable(f"attention backend 'xformers' is unavailable on {device_type}: its kernels "
                                 f"cannot run here ({reason}); use backend 'sdpa'") from None


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    check_xformers(q.device.type)
    import xformers.ops as xops
    bias = None
    if dense is not None:
        # xformers wants an additive bias whose last dim is padded to a multiple of 8.
        lq, lk = dense.shape
        pad = (-lk) % 8
        full = torch.full((q.shape[0], q.shape[1], lq, lk + pad), float("-inf"), dtype=q.dtype, device=q.device)
        full[..., :lk].masked_fill_(dense, 0.0)
        bias = full[..., :lk]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)
