"""The fused QK-norm + RoPE kernels (run in Triton's CPU interpreter) against the plain PyTorch
ops, in value and gradient, alone and inside a trunk."""
from __future__ import annotations

import pytest
import torch
import triton  # noqa: F401  (the dev extra installs it; the kernels run in its CPU interpreter here)

from tessera.nn.qk_norm_rope import rms_norm_rope, rms_norm_rope_reference
from gpu_blocks import assert_compiled_blocks_agree
from triton_interpreter import run_interpreted


def test_kernels_match_the_reference_in_value_and_gradient():
    out = run_interpreted("""
        import torch
        from tessera.nn.qk_norm_rope import (ROWS_PER_PROGRAM, rms_norm_rope_reference, triton_rms_norm_rope,
                                             triton_rms_norm_rope_backward)
        from tessera.nn.rope import RotaryEmbedding
        torch.manual_seed(0)
        # (B, H, L, D): rows that fill programs exactly, a ragged last program, one row
        for b, h, length, d in [(2, 4, 8, 16), (3, 3, 7, 32), (1, 1, 1, 8)]:
            qkv = torch.randn(b, length, 3, h, d).permute(2, 0, 3, 1, 4)  # q and k as the trunk makes them
            x = qkv[1].clone().requires_grad_()  # a (B, H, L, D) view with the trunk's strides
            x_view = qkv[1]
            weight = (1 + 0.3 * torch.randn(d)).requires_grad_()
            cos, sin = RotaryEmbedding(d, 2)(torch.rand(length, 2) * 9)
            expected = rms_norm_rope_reference(x, weight, cos, sin, 1e-6)
            got = triton_rms_norm_rope(x_view, weight.detach(), cos, sin, 1e-6)
            assert got.shape == expected.shape and got.stride() == (length * h * d, d, h * d, 1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            grad = torch.randn(b, h, length, d).transpose(2, 3).contiguous().transpose(2, 3)  # strided, as SDPA's
            want_x, want_w = torch.autograd.grad(expected, (x, weight), grad)
            got_x, got_w = triton_rms_norm_rope_backward(grad, x_view, weight.detach(), cos, sin, 1e-6)
            torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_w, want_w, atol=1e-4, rtol=1e-5)
            print(b * h * length % ROWS_PER_PROGRAM)
    """)
    remainders = [int(line) for line in out.split()]
    assert 0 in remainders and any(r != 0 for r in remainders)  # full and ragged last programs both ran


def test_trunk_with_the_fused_kernels_matches_the_plain_trunk():
    """A next-scale trunk (AdaLN, 2-axis RoPE, block-causal mask) with the custom op and its
    registered backward against the same weights on plain ops: outputs and every gradient."""
    out = run_interpreted("""
        import torch
        import tessera.nn.qk_norm_rope as fused
        from tessera.nn.masks import AttentionMask
        from tessera.nn.trunk import Trunk, TrunkConfig
        from triton_interpreter import assert_trunks_agree
        calls = []
        op = fused._fused_op
        fused._fused_op = lambda *a: calls.append(1) or op(*a)
        torch.manual_seed(0)
        cfg = dict(dim=32, n_layers=2, n_heads=2, cond_dim=8, attention="sdpa")  # (on prefix kernels: test_qkv_attention)
        plain = Trunk(TrunkConfig(**cfg, fused_qk_rope=False))
        for p in plain.parameters():
            torch.nn.init.normal_(p, std=0.3)  # AdaLN and the gains away from their identity init
        trunk = Trunk(TrunkConfig(**cfg, fused_qk_rope=True))
        trunk.load_state_dict(plain.state_dict())
        x, cond = torch.randn(2, 14, 32), torch.randn(2, 8)
        positions = torch.rand(14, 2) * 4
        mask = AttentionMask.block_causal([1, 4, 9])
        assert_trunks_agree(plain, trunk, x, positions, mask, cond)
        print(len(calls))
    """)
    assert int(out) == 4  # q and k in each of the two layers


def test_without_triton_the_plain_ops_run():
    """On a CPU without the interpreter, the fused entry point is the reference itself."""
    x = torch.randn(1, 2, 3, 8)
    cos, sin = torch.rand(3, 4), torch.rand(3, 4)
    assert torch.equal(rms_norm_rope(x, torch.ones(8), cos, sin, 1e-6),
                       rms_norm_rope_reference(x, torch.ones(8), cos, sin, 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on a GPU; the interpreter tests above run them here")
def test_compiled_block_on_a_gpu_matches_the_plain_block_in_bf16():
    """One compiled VAR-shaped block in bf16 autocast, fused (QK-norm + RoPE, SwiGLU) against plain:
    outputs and gradients agree to bf16 rounding."""
    assert_compiled_blocks_agree(("sdpa", "sdpa"), group_rows=64)


def test_a_weight_of_the_wrong_size_is_refused_before_any_kernel_reads_it():
    from tessera.nn.rope import RotaryEmbedding
    cos, sin = RotaryEmbedding(16, 1)(torch.arange(5.0)[:, None])
    x = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"norm weight has shape \(0,\); \(16,\) expected"):
        rms_norm_rope(x, torch.empty(0), cos, sin, 1e-6)  # a ZeRO-3 shard that was never gathered
