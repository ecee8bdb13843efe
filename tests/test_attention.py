"""Every attention backend against an independent float64 reference, for every mask."""
import importlib.util
import warnings

import pytest
import torch

from tessera.nn.attention import (BackendUnavailable, PreparedMask, attend, auto_summary, check_xformers,
                                  math_attention, prefix_spans, prepare_mask, query_groups, resolve_backend)
from tessera.nn.masks import AttentionMask

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

L = 11
MASKS = {
    "causal": AttentionMask.causal(),
    "bidirectional": AttentionMask.bidirectional(),
    "block_causal": AttentionMask.block_causal([1, 4, 6]),
    "window_sink": AttentionMask.window_sink(window=3, n_sink=2),
    "band": AttentionMask.band(window=2, n_sink=1),
}


def rule(kind: str, q: int, k: int) -> bool:
    """The masks written out by hand, position by position."""
    if kind == "bidirectional":
        return True
    if kind == "causal":
        return k <= q
    if kind == "block_causal":
        block = lambda i: 0 if i < 1 else (1 if i < 5 else (2 if i < L else 99))  # noqa: E731  (past L: unused slots)
        return block(k) <= block(q)
    if kind == "band":
        return abs(q - k) <= 2 or k < 1
    return k <= q and (q - k < 3 or k < 2)


def reference(q, k, v, kind, q_pos, kv_pos):
    out = torch.zeros_like(q)
    for i, qp in enumerate(q_pos.tolist()):
        allowed = torch.tensor([rule(kind, qp, kp) for kp in kv_pos.tolist()])
        scores = torch.einsum("bhd,bhkd->bhk", q[:, :, i], k) / q.shape[-1] ** 0.5
        scores[..., ~allowed] = float("-inf")
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), v)
    return out


def backends():
    yield "sdpa"
    yield "flex"
    yield "math"
    try:
        check_xformers("cpu")
        yield "xformers"
    except BackendUnavailable:
        pass


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("backend", list(backends()))
def test_full_sequence_matches_reference(kind, backend):
    q, k, v = (torch.randn(2, 3, L, 8, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(L)
    prepared = prepare_mask(MASKS[kind], pos, pos, backend, full_sequence=True)
    torch.testing.assert_close(attend(q, k, v, prepared), reference(q, k, v, kind, pos, pos))


@pytest.mark.parametrize("kind", ["causal", "block_causal", "window_sink"])
@pytest.mark.parametrize("backend", list(backends()))
def test_cache_positions_match_reference(kind, backend):
    """Queries at absolute positions 5..7 against a 16-slot cache (slots past 7 unwritten)."""
    kv_pos = torch.arange(16)
    q_pos = torch.tensor([5, 6, 7])
    q = torch.randn(2, 3, 3, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64) for _ in range(2))
    prepared = prepare_mask(MASKS[kind], q_pos, kv_pos, backend, full_sequence=False)
    torch.testing.assert_close(attend(q, k, v, prepared), reference(q, k, v, kind, q_pos, kv_pos))


def test_xformers_unavailable_gives_clear_error():
    try:
        check_xformers("cpu")
    except BackendUnavailable as err:
        assert "xformers" in str(err) and "sdpa" in str(err) and "\n" not in str(err)
    else:
        pytest.skip("xformers kernels run on this machine; the parity tests above cover it")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        prepare_mask(AttentionMask.causal(), torch.arange(3), torch.arange(3), "flash9", True)


def test_auto_picks_per_mask_kind_and_device():
    """`auto` on CUDA (each measured fastest there): FlexAttention for window+sink, the prefix-mask
    Triton kernels for block-causal (where Triton is installed), SDPA for every other case; SDPA on CPU."""
    triton = importlib.util.find_spec("triton") is not None
    on_cuda = {"window_sink": "flex", "block_causal": "triton" if triton else "sdpa"}
    for kind in MASKS:
        assert resolve_backend("auto", kind, "cpu") == "sdpa"
        assert resolve_backend("auto", kind, "cuda") == on_cuda.get(kind, "sdpa")
        assert resolve_backend("math", kind, "cuda") == "math"
    assert auto_summary("cuda") == "window_sink: flex; " + ("block_causal: triton; " if triton else "") + "others: sdpa"
    assert auto_summary("cpu") == "sdpa"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 8, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(L)
    for kind, mask in MASKS.items():
        out = attend(q, k, v, prepare_mask(mask, pos, pos, "auto", full_sequence=True))
        torch.testing.assert_close(out, reference(q, k, v, kind, pos, pos))


def test_flex_block_mask_of_a_full_sequence_is_built_once():
    pos = torch.arange(L)
    mask = AttentionMask.window_sink(window=3, n_sink=2)
    first = prepare_mask(mask, pos, pos, "flex", full_sequence=True).block_mask
    assert prepare_mask(mask, pos, pos, "flex", full_sequence=True).block_mask is first


def test_prefix_spans_merge_small_blocks_forward():
    assert prefix_spans((1, 4, 9, 16, 25, 36, 64, 100), 64) == [(0, 91, 6), (91, 155, 1), (155, 255, 1)]
    assert prefix_spans((1, 4, 9), 1) == [(0, 1, 1), (1, 5, 1), (5, 14, 1)]
    assert prefix_spans((1, 4, 9), 100) == [(0, 14, 3)]
    assert prefix_spans((8, 1, 1), 8) == [(0, 8, 1), (8, 10, 2)]  # a short last span keeps its mask


@pytest.mark.parametrize("min_rows", [1, 3, 5, 64])
def test_block_causal_query_groups_match_reference_in_value_and_gradient(min_rows):
    """Block-causal attention as one SDPA call per query group (unmasked where a group is one
    block) against the reference and, for gradients, against one call with the dense mask."""
    sizes = [1, 2, 3, 5]
    mask = AttentionMask.block_causal(sizes)
    pos = torch.arange(sum(sizes))
    q, k, v = (torch.randn(2, 3, pos.numel(), 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grouped = PreparedMask("sdpa", groups=query_groups(mask, pos.device, min_rows))
    dense = PreparedMask("sdpa", dense=mask.dense(pos, pos))
    out = attend(q, k, v, grouped)
    expected = attend(q, k, v, dense)
    torch.testing.assert_close(expected, math_attention(q, k, v, mask.dense(pos, pos)))
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_a_block_causal_sequence_under_sdpa_runs_as_query_groups_when_asked():
    sizes = [1, 4, 9, 16, 25, 36, 64, 100]
    pos = torch.arange(sum(sizes))
    mask = AttentionMask.block_causal(sizes)
    assert prepare_mask(mask, pos, pos, "sdpa", full_sequence=True).groups is None  # the default: one call
    assert prepare_mask(mask, pos, pos, "sdpa", full_sequence=True, group_rows=1000).groups is None  # one span
    prepared = prepare_mask(mask, pos, pos, "sdpa", full_sequence=True, group_rows=64)
    assert [(g.start, g.end, g.kv_end, g.dense is None) for g in prepared.groups] == [
        (0, 91, 91, False), (91, 155, 155, True), (155, 255, 255, True)]
    assert prepared.groups[0].dense.shape == (91, 91)
