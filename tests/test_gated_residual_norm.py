"""The fused gated residual + modulated RMSNorm kernels (Triton's CPU interpreter here) against the
plain PyTorch ops, alone and inside an AdaLN trunk; and on a GPU in bf16."""
from __future__ import annotations

import pytest
import torch
import triton  # noqa: F401  (the dev extra installs it; the kernels run in its CPU interpreter here)

from tessera.nn.gated_residual_norm import gated_residual_norm, gated_residual_norm_reference
from triton_interpreter import run_interpreted


def test_kernels_match_the_reference_in_value_and_gradient():
    """Ragged programs and row steps, a width that is not a power of two, modulation rows that are
    strided chunks of one AdaLN output or expanded along C: both outputs and the gradients of x, a and
    the modulation."""
    out = run_interpreted("""
        import torch
        from tessera.nn.gated_residual_norm import (ROWS_PER_PROGRAM, gated_residual_norm,
                                                    gated_residual_norm_reference)
        torch.manual_seed(0)
        for b, length, dim in [(2, 70, 48), (3, 5, 64), (1, 2 * ROWS_PER_PROGRAM, 32)]:
            x = torch.randn(b, length, dim, requires_grad=True)
            a = torch.randn(b, length, dim, requires_grad=True)
            mods = (0.3 * torch.randn(b, 1, 3 * dim)).requires_grad_()
            gate, shift, scale = mods.chunk(3, -1)
            if dim == 32:  # a row that is not unit-strided along C (one value per sample, expanded)
                scale = scale[..., :1].expand_as(scale)
            grads = torch.randn(b, length, dim), torch.randn(b, length, dim)
            want = gated_residual_norm_reference(x, a, gate, shift, scale, 1e-6)
            got = gated_residual_norm(x, a, gate, shift, scale, 1e-6)
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            want_grads = torch.autograd.grad(want, (x, a, mods), grads)
            got_grads = torch.autograd.grad(got, (x, a, mods), grads)
            for name, w, g in zip(("x", "a", "modulation"), want_grads, got_grads):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)
            print(length % ROWS_PER_PROGRAM)
    """)
    remainders = [int(line) for line in out.split()]
    assert 0 in remainders and any(r != 0 for r in remainders)  # full and ragged last programs both ran


def test_trunk_with_the_fused_kernels_matches_the_plain_trunk():
    """A next-scale trunk (AdaLN, block-causal mask) with the custom op against the same weights on
    plain ops: outputs and every gradient; the op ran twice per layer (after attention, and adding
    each layer's MLP branch in the next layer's first norm or the final norm)."""
    out = run_interpreted("""
        import torch
        import tessera.nn.trunk as trunk_module
        from tessera.nn.masks import AttentionMask
        from tessera.nn.trunk import Trunk, TrunkConfig
        from triton_interpreter import assert_trunks_agree
        calls = []
        op = trunk_module.gated_residual_norm
        trunk_module.gated_residual_norm = lambda *a: calls.append(a[-1]) or op(*a)
        torch.manual_seed(0)
        cfg = dict(dim=32, n_layers=2, n_heads=2, cond_dim=8, attention="sdpa", fused_qk_rope=False)
        plain = Trunk(TrunkConfig(**cfg, fused_residual_norm=False))
        for p in plain.parameters():
            torch.nn.init.normal_(p, std=0.3)  # AdaLN away from its zero init
        trunk = Trunk(TrunkConfig(**cfg, fused_residual_norm=True))
        trunk.load_state_dict(plain.state_dict())
        x, cond = torch.randn(2, 14, 32), torch.randn(2, 8)
        assert_trunks_agree(plain, trunk, x, torch.rand(14, 2) * 4, AttentionMask.block_causal([1, 4, 9]), cond)
        print(calls.count(True))
    """)
    assert int(out) == 4  # twice per layer of the fused trunk (the plain trunk passed fused=False)


def test_without_triton_the_plain_ops_run_and_bad_shapes_are_refused():
    x, a = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mods = torch.randn(2, 1, 8).chunk(1, -1) * 3
    for got, want in zip(gated_residual_norm(x, a, *mods, 1e-6), gated_residual_norm_reference(x, a, *mods, 1e-6)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="\\(B, 1, C\\) modulation"):
        gated_residual_norm(x, a, torch.randn(2, 8), *mods[1:], 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on a GPU; the interpreter tests above run them here")
def test_compiled_kernels_on_a_gpu_match_the_reference_in_bf16():
    """VAR-d16's width and a bf16 residual stream against the plain ops in float32."""
    torch.manual_seed(0)
    x, a = (torch.randn(4, 333, 1024, device="cuda").bfloat16().requires_grad_() for _ in range(2))
    mods = (0.3 * torch.randn(4, 1, 3 * 1024, device="cuda")).bfloat16().requires_grad_()
    grads = [torch.randn(4, 333, 1024, device="cuda").bfloat16() for _ in range(2)]
    got = gated_residual_norm(x, a, *mods.chunk(3, -1), 1e-6)
    got_grads = torch.autograd.grad(got, (x, a, mods), grads)
    want = gated_residual_norm_reference(x.float(), a.float(), *mods.float().chunk(3, -1), 1e-6)
    want_grads = torch.autograd.grad(want, (x, a, mods), [g.float() for g in grads])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=5e-2, rtol=2e-2)
    for name, g, w in zip(("x", "a", "modulation"), got_grads, want_grads):
        assert (g.float() - w.float()).norm() <= 0.01 * w.float().norm(), name
