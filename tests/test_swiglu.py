"""The SwiGLU activation kernels (Triton's CPU interpreter here, compiled on a GPU) against PyTorch;
the compiled-block comparison on a GPU (tests/gpu_blocks.py, run by test_qk_norm_rope.py and
test_qkv_attention.py) covers the fused MLP inside a block."""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import run_interpreted

from tessera.nn.layers import SwiGLU
from tessera.nn.swiglu import swiglu


def test_kernels_match_the_reference_forward_and_backward():
    """Float32 and bf16, a hidden size that is no multiple of the block, leading dimensions, and a
    strided input (a column slice): output and the packed input's gradient."""
    run_interpreted("""
        import torch
        import tessera.nn.swiglu as module
        from tessera.nn.swiglu import swiglu, swiglu_reference
        module.BLOCK = 16  # several column blocks, the last one partial
        torch.manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for shape, strided in (((3, 5, 2 * 40), False), ((7, 2 * 24), True)):
                wide = torch.randn(*shape[:-1], shape[-1] + (6 if strided else 0)) * 3
                h13 = wide[..., :shape[-1]].to(dtype).requires_grad_()
                grad = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
                got = swiglu(h13)
                (got_grad,) = torch.autograd.grad(got, h13, grad)
                want = swiglu_reference(h13.float())
                (want_grad,) = torch.autograd.grad(want, h13, grad.float())
                assert got.dtype == dtype and got_grad.dtype == dtype and got_grad.is_contiguous()
                torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
                torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=tol, rtol=tol)
        print("ok")
    """)


def test_fused_mlp_in_the_interpreter_matches_the_plain_one():
    """The trunk's SwiGLU MLP with fused=True against fused=False, same weights: output and every gradient."""
    out = run_interpreted("""
        import torch
        import tessera.nn.swiglu as module
        from tessera.nn.layers import SwiGLU
        calls = []
        op = module._fused_op
        module._fused_op = lambda h: calls.append(1) or op(h)
        torch.manual_seed(0)
        plain, fused = SwiGLU(32, 48), SwiGLU(32, 48, fused=True)
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(2, 9, 32)
        outs = [m(x) for m in (plain, fused)]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        for m, out in zip((plain, fused), outs):
            out.square().sum().backward()
        for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
        print(len(calls))
    """)
    assert int(out) == 1


def test_without_triton_or_unfused_the_reference_runs_and_odd_widths_are_refused():
    mlp = SwiGLU(8, 6, fused=True)  # on a CPU without the interpreter: the reference path
    x = torch.randn(2, 8)
    gate, up = mlp.w13(x).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), mlp.w2(torch.nn.functional.silu(gate) * up))
    with pytest.raises(ValueError, match="2 \\* hidden"):
        swiglu(torch.randn(3, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on a GPU; the interpreter tests above run them here")
def test_compiled_kernels_on_a_gpu_match_the_reference_in_bf16():
    torch.manual_seed(0)
    h13 = (torch.randn(4, 333, 2 * 2752, device="cuda") * 3).bfloat16().requires_grad_()
    grad = torch.randn(4, 333, 2752, device="cuda").bfloat16()
    got = swiglu(h13)
    (got_grad,) = torch.autograd.grad(got, h13, grad)
    want = torch.nn.functional.silu(h13.float()[..., :2752]) * h13.float()[..., 2752:]
    (want_grad,) = torch.autograd.grad(want, h13, grad.float())
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=3e-2, rtol=2e-2)
