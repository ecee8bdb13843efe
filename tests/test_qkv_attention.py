"""The packed QK-norm + RoPE + prefix attention op (Triton's CPU interpreter here) against its parts
run one by one, and against plain PyTorch; and the trunk choosing it."""
from __future__ import annotations

import pytest
import torch

from gpu_blocks import assert_compiled_blocks_agree
from triton_interpreter import needs_runtime_loop_bounds, run_interpreted


@needs_runtime_loop_bounds
def test_packed_op_equals_its_parts_and_matches_the_reference():
    """Output and the gradients of the packed projection and both gains: equal to the kernels run
    op by op (the same arithmetic, only where dQ, dK, dV land differs), close to plain PyTorch."""
    run_interpreted("""
        import torch
        from tessera.nn.prefix_attention import PrefixMask, prefix_attention, prefix_attention_reference
        from tessera.nn.qk_norm_rope import rms_norm_rope, rms_norm_rope_reference
        from tessera.nn.qkv_attention import qkv_prefix_attention
        from tessera.nn.rope import RotaryEmbedding
        torch.manual_seed(0)
        for sizes, h, d in [((1, 4, 9, 16), 2, 16), ((3, 17, 5), 3, 32)]:
            length = sum(sizes)
            mask = PrefixMask.block_causal(sizes, "cpu")
            cos, sin = RotaryEmbedding(d, 2)(torch.rand(length, 2) * 9)
            qkv = torch.randn(2, length, 3, h, d, requires_grad=True)
            gains = [(1 + 0.3 * torch.randn(d)).requires_grad_() for _ in range(2)]
            grad = torch.randn(2, h, length, d)

            def by_parts(norm_rope, attention):
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
                q, k = (norm_rope(t, w, cos, sin, 1e-6) for t, w in zip((q, k), gains))
                out = attention(q, k, v, mask)
                return out, torch.autograd.grad(out, [qkv, *gains], grad)

            packed = qkv_prefix_attention(qkv, *gains, cos, sin, 1e-6, mask)
            packed_grads = torch.autograd.grad(packed, [qkv, *gains], grad)
            parts, part_grads = by_parts(rms_norm_rope, prefix_attention)
            reference, reference_grads = by_parts(rms_norm_rope_reference, prefix_attention_reference)
            assert torch.equal(packed, parts)
            for name, got, same, want in zip(("qkv", "q gain", "k gain"), packed_grads, part_grads, reference_grads):
                assert torch.equal(got, same), name
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
    """)


@needs_runtime_loop_bounds
def test_trunk_runs_the_packed_op_on_prefix_kernels_and_matches_the_plain_trunk():
    """A next-scale trunk (AdaLN, 2-axis RoPE, block-causal mask) on the packed op against the same
    weights on plain ops and SDPA: outputs and every gradient; the op ran once per layer."""
    out = run_interpreted("""
        import torch
        import tessera.nn.trunk as trunk_module
        from tessera.nn.masks import AttentionMask
        from tessera.nn.trunk import Trunk, TrunkConfig
        from triton_interpreter import assert_trunks_agree
        calls = []
        op = trunk_module.qkv_prefix_attention
        trunk_module.qkv_prefix_attention = lambda *a: calls.append(1) or op(*a)
        torch.manual_seed(0)
        cfg = dict(dim=64, n_layers=2, n_heads=2, cond_dim=8)
        plain = Trunk(TrunkConfig(**cfg, attention="sdpa", fused_qk_rope=False))
        for p in plain.parameters():
            torch.nn.init.normal_(p, std=0.2)  # AdaLN and the gains away from their identity init
        trunk = Trunk(TrunkConfig(**cfg, attention="auto"))
        trunk.load_state_dict(plain.state_dict())
        x, cond = torch.randn(2, 30, 64), torch.randn(2, 8)
        assert_trunks_agree(plain, trunk, x, torch.rand(30, 2) * 4, AttentionMask.block_causal([1, 4, 9, 16]), cond)
        print(len(calls))
    """)
    assert int(out) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on a GPU; the interpreter tests above run them here")
def test_compiled_block_on_a_gpu_with_the_packed_op_matches_the_plain_block_in_bf16():
    """One compiled VAR-shaped block in bf16 autocast on the packed op against plain ops and SDPA
    with the dense mask: outputs and gradients agree to bf16 rounding."""
    assert_compiled_blocks_agree(("sdpa", "triton"))  # the packed op runs on the prefix kernels


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a GPU of compute capability 9.0 (Hopper) or newer")
def test_compiled_block_on_a_gpu_with_dependent_launches_matches_the_plain_block_in_bf16():
    """train.compile_pdl: the fused block compiled with Inductor's programmatic dependent launch
    (its kernels start early and wait only for the kernel they read from) agrees with the plain one."""
    assert_compiled_blocks_agree(("sdpa", "triton"), fused_options={"triton.enable_pdl": True})
