"""The prefix-mask attention kernels (Triton's CPU interpreter here, compiled on a GPU) against SDPA
with the dense mask, in value and gradient, alone and inside a trunk; and how they are chosen."""
from __future__ import annotations

import pytest
import torch

from tessera.nn.attention import prepare_mask
from tessera.nn.masks import AttentionMask
from tessera.nn.prefix_attention import (PrefixMask, prefix_attention, prefix_attention_reference,
                                         prefix_attention_supported)
from triton_interpreter import needs_runtime_loop_bounds, run_interpreted


@needs_runtime_loop_bounds
def test_kernels_match_the_reference_in_value_and_gradient():
    """Block-causal, causal and a query suffix over a longer key sequence; tiles that fit the
    length exactly and ragged last tiles; the trunk's strided q/k/v layout."""
    out = run_interpreted("""
        import torch
        from tessera.nn.prefix_attention import (PrefixMask, TileConfig, prefix_attention_reference,
                                                 triton_prefix_attention, triton_prefix_attention_backward)
        torch.manual_seed(0)
        cases = [  # (kv_end, kv_len, head size, tiles)
            (PrefixMask.block_causal((1, 4, 9, 16, 25, 9), "cpu"), 64, 16, TileConfig(16, 16, 4, 1)),
            (PrefixMask.block_causal((1, 4, 9, 16, 25, 36), "cpu"), 91, 32, TileConfig(32, 16, 4, 1)),
            (PrefixMask.block_causal((3, 17, 5), "cpu"), 25, 16, TileConfig(16, 32, 4, 1)),
            (PrefixMask.from_kv_end(torch.arange(1, 41), 40), 40, 16, TileConfig(16, 16, 4, 1)),  # causal
            (PrefixMask.from_kv_end(torch.tensor([30] * 7 + [45] * 12), 45), 45, 16, TileConfig(16, 16, 4, 1)),
        ]
        for mask, kv_len, d, tiles in cases:
            lq = mask.kv_end.numel()
            q = torch.randn(2, lq, 2, d).transpose(1, 2)
            k, v = torch.randn(2, kv_len, 2, 2, d).permute(2, 0, 3, 1, 4)  # as the trunk's qkv split
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            want = prefix_attention_reference(*leaves, mask)
            got, lse = triton_prefix_attention(q, k, v, mask.kv_end, tiles)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
            grad = torch.randn_like(want)
            wants = torch.autograd.grad(want, leaves, grad)
            gots = triton_prefix_attention_backward(grad, q, k, v, got, lse, mask.kv_end, mask.first_rows, tiles, tiles)
            for name, g, w in zip("qkv", gots, wants):
                torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=name)
            print(lq % tiles.block_m, kv_len % tiles.block_n)
    """)
    remainders = [int(r) for r in out.split()]
    assert 0 in remainders and any(r != 0 for r in remainders)  # full and ragged last tiles both ran


@needs_runtime_loop_bounds
def test_trunk_on_the_triton_backend_matches_sdpa():
    """A next-scale trunk through the custom op and its registered backward against the same
    weights on SDPA with the dense mask: outputs and every gradient."""
    out = run_interpreted("""
        import torch
        import tessera.nn.prefix_attention as pa
        from tessera.nn.masks import AttentionMask
        from tessera.nn.trunk import Trunk, TrunkConfig
        from triton_interpreter import assert_trunks_agree
        calls = []
        op = pa._forward_op
        pa._forward_op = lambda *a: calls.append(1) or op(*a)
        torch.manual_seed(0)
        cfg = dict(dim=64, n_layers=2, n_heads=2, cond_dim=8, fused_qk_rope=False)
        plain = Trunk(TrunkConfig(**cfg, attention="sdpa"))
        for p in plain.parameters():
            torch.nn.init.normal_(p, std=0.2)
        trunk = Trunk(TrunkConfig(**cfg, attention="auto"))  # auto picks the kernels where Triton runs
        trunk.load_state_dict(plain.state_dict())
        x, cond = torch.randn(2, 30, 64), torch.randn(2, 8)
        mask = AttentionMask.block_causal([1, 4, 9, 16])
        positions = torch.rand(30, 2) * 4
        assert_trunks_agree(plain, trunk, x, positions, mask, cond)
        print(len(calls))
    """)
    assert int(out) == 2  # one call per layer


def test_prefix_mask_rejects_masks_the_kernels_cannot_take():
    with pytest.raises(ValueError, match="non-decreasing"):
        PrefixMask.from_kv_end(torch.tensor([2, 1]), 2)
    with pytest.raises(ValueError, match="non-decreasing"):
        PrefixMask.from_kv_end(torch.tensor([0, 1]), 2)  # a row that sees no key
    with pytest.raises(ValueError, match="non-decreasing"):
        PrefixMask.from_kv_end(torch.tensor([1, 3]), 2)


def test_block_causal_prefix_mask_is_the_block_causal_rule():
    sizes = (1, 4, 9, 3)
    pos = torch.arange(sum(sizes))
    assert torch.equal(PrefixMask.block_causal(sizes, "cpu").dense(pos.numel()),
                       AttentionMask.block_causal(list(sizes)).dense(pos, pos))


def test_triton_backend_routes_full_sequences_to_the_kernels_and_the_rest_to_sdpa():
    sizes = [1, 4, 9]
    pos = torch.arange(14)
    prepared = prepare_mask(AttentionMask.block_causal(sizes), pos, pos, "triton", full_sequence=True)
    assert prepared.prefix is not None and torch.equal(prepared.prefix.kv_end, torch.tensor([1] + [5] * 4 + [14] * 9,
                                                                                             dtype=torch.int32))
    causal = prepare_mask(AttentionMask.causal(), pos, pos, "triton", full_sequence=True)
    assert torch.equal(causal.prefix.kv_end, torch.arange(1, 15, dtype=torch.int32))
    cached = prepare_mask(AttentionMask.block_causal(sizes), pos[5:], pos, "triton", full_sequence=False)
    assert cached.prefix is None and cached.backend == "sdpa" and cached.dense is not None
    band = prepare_mask(AttentionMask.band(2), pos, pos, "triton", full_sequence=True)
    assert band.prefix is None and band.dense is not None


def test_without_triton_the_reference_runs():
    """On a CPU without the interpreter, the entry point is SDPA with the dense mask."""
    q, k, v = torch.randn(3, 1, 2, 14, 16)
    mask = PrefixMask.block_causal((1, 4, 9), "cpu")
    assert torch.equal(prefix_attention(q, k, v, mask), prefix_attention_reference(q, k, v, mask))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the compiled kernels run on a GPU; the interpreter tests above run them here")
def test_kernels_on_a_gpu_match_sdpa_in_bf16_at_var_d16_shape():
    """VAR-d16's attention (batch 4, 16 heads of 64, 680 block-causal positions) in bf16: the
    kernels' output and gradients against SDPA with the dense mask, both against float32 math."""
    from tessera.nn.attention import math_attention
    torch.manual_seed(0)
    sizes = tuple(s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    mask = PrefixMask.block_causal(sizes, "cuda")
    qkv = torch.randn(4, 680, 3, 16, 64, device="cuda").permute(2, 0, 3, 1, 4)
    grad = torch.randn(4, 16, 680, 64, device="cuda")
    results = []
    for fn, dtype in ((prefix_attention, torch.bfloat16), (prefix_attention_reference, torch.bfloat16),
                      (lambda q, k, v, m: math_attention(q, k, v, m.dense(680)), torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in qkv]
        out = fn(*leaves, mask)
        results.append([out.float(), *(g.float() for g in torch.autograd.grad(out, leaves, grad.to(dtype)))])
    kernel, sdpa, exact = results
    assert prefix_attention_supported(qkv[0].bfloat16()) and not prefix_attention_supported(qkv[0])  # fp32: TF32
    for name, got, base, want in zip(("out", "dq", "dk", "dv"), kernel, sdpa, exact):
        error, sdpa_error = (got - want).norm() / want.norm(), (base - want).norm() / want.norm()
        assert error <= 2 * sdpa_error + 1e-3, (name, float(error), float(sdpa_error))
