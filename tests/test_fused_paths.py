"""Fused and fast training paths against the plain ones: loss and gradients agree on random inputs."""
import json

import pytest
import torch

from tessera.config import ConfigError
from tessera.generators.heads import token_cross_entropy
from tessera.nn.fused_cross_entropy import (_compiled_chunk_step, fused_linear_cross_entropy,
                                             weighted_linear_cross_entropy)
from tessera.nn.masks import AttentionMask
from tessera.nn.trunk import Block, Trunk, TrunkConfig
from tessera.registry import build_model
from tessera.train.trainer import train
from triton_interpreter import run_interpreted
from tiny_runs import tiny_recipe


@pytest.mark.parametrize("smoothing,z_loss,chunk", [(0.0, 0.0, 7), (0.1, 1e-3, 16), (0.0, 1e-2, 1000)])
def test_fused_linear_cross_entropy_matches_full_logits(smoothing, z_loss, chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 101, (37,))
    loss, logs = fused_linear_cross_entropy(h, weight, target, smoothing, z_loss, chunk)
    grad_h, grad_w = torch.autograd.grad(3.0 * loss, (h, weight))
    ref_loss, ref_logs = token_cross_entropy(h @ weight.t(), target, smoothing, z_loss)
    ref_h, ref_w = torch.autograd.grad(3.0 * ref_loss, (h, weight))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert logs["ce"].item() == pytest.approx(ref_logs["ce"].item(), rel=1e-6)
    assert logs["acc"].item() == pytest.approx(ref_logs["acc"].item())
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-4, atol=1e-6)  # float32 logits on both sides
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-4, atol=1e-6)


def test_fused_linear_cross_entropy_under_bf16_autocast_matches_full_logits():
    """Under autocast the logits' gradient is cast once to bf16 for both products; the loss and the
    gradients stay within bf16 rounding of the full-logits loss, in the inputs' dtypes."""
    torch.manual_seed(0)
    h = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    target = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = fused_linear_cross_entropy(h, weight, target, 0.1, 1e-3, 16)
        ref_loss, ref_logs = token_cross_entropy(h @ weight.t(), target, 0.1, 1e-3)
    grad_h, grad_w = torch.autograd.grad(loss, (h, weight))
    ref_h, ref_w = torch.autograd.grad(ref_loss, (h, weight))
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    assert logs["acc"].item() == pytest.approx(ref_logs["acc"].item())
    torch.testing.assert_close(grad_h.float(), ref_h.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grad_w, ref_w, rtol=2e-2, atol=2e-3)


def test_triton_loss_chunks_match_the_pytorch_ones():
    """loss_kernel=triton in Triton's CPU interpreter: the loss, logged terms, accuracy and gradients
    of the PyTorch chunks, with and without label smoothing and z-loss, in float32 and under bf16
    autocast, over a vocabulary several loop steps wide (the last one partial) and a ragged last chunk."""
    run_interpreted("""
        import torch
        import tessera.nn.cross_entropy_kernel as kernel_module
        from tessera.nn.fused_cross_entropy import weighted_linear_cross_entropy
        kernel_module.MAX_BLOCK = 32  # 101 columns: four loop steps
        calls = []
        real = kernel_module.triton_cross_entropy_terms
        import tessera.nn.fused_cross_entropy as fused
        fused.triton_cross_entropy_terms = lambda *a: calls.append(1) or real(*a)
        torch.manual_seed(0)
        for autocast, tol in ((False, 1e-5), (True, 1e-2)):
            for smoothing, z_loss in ((0.0, 0.0), (0.1, 1e-3)):
                h = (torch.randn(45, 24) * 2).requires_grad_()
                weight = torch.randn(101, 24, requires_grad=True)
                target, row_weight = torch.randint(0, 101, (45,)), torch.rand(45)
                results = []
                for kernel in ("torch", "triton"):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        loss, ce, zl, correct = weighted_linear_cross_entropy(h, weight, target, row_weight,
                                                                              smoothing, z_loss, 16, kernel)
                    results.append((loss, ce, zl, correct, *torch.autograd.grad(2.0 * loss, (h, weight))))
                for name, want, got in zip(("loss", "ce", "z", "correct"), *results):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {autocast} {smoothing}")
                for name, want, got in zip(("grad h", "grad w"), results[0][4:], results[1][4:]):
                    # the interpreter truncates float32 to bf16 (a GPU rounds): up to one bf16 step per element
                    assert (got - want).float().norm() <= tol * want.float().norm(), (name, autocast, smoothing)
        assert len(calls) == 4 * 3, len(calls)  # 45 rows in chunks of 16, four settings: the kernel ran
    """)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on a GPU; the interpreter test above runs it here")
def test_triton_loss_chunks_on_a_gpu_match_the_pytorch_ones_in_bf16():
    """Under bf16 autocast both chunk steps round the logits' gradient to bf16 (at different points,
    so single elements differ by a bf16 step): each value's error against float32 math is the
    PyTorch chunks' own, within 1%."""
    torch.manual_seed(0)
    h = torch.randn(5000, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(4096, 256, device="cuda") * 0.1).requires_grad_()
    target, row_weight = torch.randint(0, 4096, (5000,), device="cuda"), torch.rand(5000, device="cuda")
    results = []
    for kernel, autocast in (("torch", False), ("torch", True), ("triton", True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, ce, zl, correct = weighted_linear_cross_entropy(h, weight, target, row_weight, 0.1, 1e-3, 2048, kernel)
        results.append([t.detach().float() for t in (loss, ce, zl, correct, *torch.autograd.grad(loss, (h, weight)))])
    for name, exact, plain, got in zip(("loss", "ce", "z", "correct", "grad h", "grad w"), *results):
        error, plain_error = (got - exact).norm() / exact.norm(), (plain - exact).norm() / exact.norm()
        assert error <= 1.01 * plain_error + 1e-6, (name, float(error), float(plain_error))


def test_compiled_loss_chunks_match_the_eager_ones():
    """loss_kernel=compiled: the chunk step compiled by Inductor gives the eager chunks' loss, logged
    terms and gradients (a ragged last chunk included); without gradients it computes none."""
    torch.manual_seed(0)
    h = torch.randn(45, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    target, row_weight = torch.randint(0, 101, (45,)), torch.rand(45)
    results = []
    for kernel in ("torch", "compiled"):
        loss, ce, zl, correct = weighted_linear_cross_entropy(h, weight, target, row_weight, 0.1, 1e-3, 16, kernel)
        results.append((loss, ce, zl, correct, *torch.autograd.grad(2.0 * loss, (h, weight))))
    assert _compiled_chunk_step.cache_info().currsize == 1  # the compiled step was built and used
    for name, eager, compiled in zip(("loss", "ce", "z", "correct", "grad h", "grad w"), *results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        loss, *_ = weighted_linear_cross_entropy(h, weight, target, row_weight, 0.1, 1e-3, 16, "compiled")
    assert loss.item() == pytest.approx(results[0][0].item(), rel=1e-5)


@pytest.mark.parametrize("shuffle", [1, 2])
def test_next_token_fused_loss_matches_plain(shuffle):
    """The generator's loss_chunk path: same loss and trunk gradients as the full-logits path."""
    common = {"vocab_size": 50, "grid_size": 4, "cond": "class", "num_classes": 3, "token_shuffle": shuffle,
              "label_smoothing": 0.1, "z_loss": 1e-3, "cond_drop": 0.0}
    batch = {"tokens": torch.randint(0, 50, (3, 4, 4)), "class": torch.tensor([0, 1, 2])}
    grads = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = build_model("next_token", "tiny", loss_chunk=chunk, **common).double()
        loss, _ = model.loss(batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (fused, fused_grads) = grads
    assert fused == pytest.approx(plain, rel=1e-6) and plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_activation_checkpointing_and_compiled_trunk_train_like_the_plain_path(tmp_path):
    """Three training steps with the trunk compiled and its blocks recomputed in backward log the
    same losses as the plain trunk (same seed, same data)."""
    base = tiny_recipe(tmp_path, images=24, train={"steps": 3, "ckpt_every": 3})
    losses = []
    for name, extra in (("plain", []), ("fast", ["train.compile=true", "train.activation_checkpointing=true"])):
        train(base.with_overrides([f"out={tmp_path / name}", *extra]), progress=False)
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines])
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.parametrize("cond_dim", [0, 8])
def test_activation_checkpointing_recomputes_blocks_with_equal_gradients(monkeypatch, cond_dim):
    """Recomputed blocks give the same output and gradients. With AdaLN this also compares the two
    block forms: without recomputation each block hands its MLP branch on to the next block's norm
    (and the last to the final norm); recomputed blocks add their own."""
    calls = []
    block_forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *args, **kw: calls.append(kw.get("defer", False))
                        or block_forward(self, *args, **kw))
    torch.manual_seed(0)
    trunk = Trunk(TrunkConfig(dim=32, n_layers=2, n_heads=4, rope_axes=1, cond_dim=cond_dim)).double()
    for p in trunk.parameters():  # AdaLN away from its zero init, so that the gates act
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    cond = torch.randn(2, cond_dim, dtype=torch.float64) if cond_dim else None
    positions = torch.arange(9.0)[:, None]
    results = []
    for recompute in (False, True):
        trunk.activation_checkpointing = recompute
        calls.clear()
        trunk.zero_grad()
        out = trunk(x, positions, AttentionMask.causal(), cond=cond)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in trunk.parameters()]))
        assert len(calls) == (4 if recompute else 2)  # each of the 2 blocks ran again in backward
        assert any(calls) == (cond_dim > 0 and not recompute)
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    torch.testing.assert_close(recomputed, plain)
    for want, got in zip(plain_grads, recomputed_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_residual_stream_matches_the_float32_one_under_autocast():
    """trunk.bf16_residual under bf16 autocast: the blocks receive bf16, and the output and gradients
    agree with the float32 residual stream within bf16 tolerance; without autocast nothing changes."""
    torch.manual_seed(0)
    cfg = dict(dim=64, n_layers=3, n_heads=4, rope_axes=1, cond_dim=16)
    plain = Trunk(TrunkConfig(**cfg))
    for p in plain.parameters():  # non-zero AdaLN so that the gates act
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    low = Trunk(TrunkConfig(**cfg, bf16_residual=True))
    low.load_state_dict(plain.state_dict())
    x, cond, positions = torch.randn(2, 12, 64), torch.randn(2, 16), torch.arange(12.0)[:, None]
    seen = []
    low.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    results = []
    for trunk in (plain, low):
        with torch.autocast("cpu", torch.bfloat16):
            out = trunk(x, positions, AttentionMask.block_causal([2, 4, 6]), cond=cond)
        out.float().square().mean().backward()
        results.append((out.float(), [p.grad for p in trunk.parameters()]))
    assert seen == [torch.bfloat16]
    (ref, ref_grads), (out, grads) = results
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert (grad - ref_grad).norm() <= 0.05 * ref_grad.norm() + 1e-6
    seen.clear()
    torch.testing.assert_close(low(x, positions, AttentionMask.causal(), cond=cond),
                               plain(x, positions, AttentionMask.causal(), cond=cond), rtol=0, atol=0)
    assert seen == [torch.float32]


@pytest.mark.parametrize("kind", ["maskgit", "magnet"])
def test_masked_generators_fused_loss_matches_plain(kind, tmp_path):
    """loss_chunk on MaskGIT and MAGNeT: same loss and gradients as the head over the masked rows."""
    torch.manual_seed(0)
    tokenizer = build_model("vq" if kind == "maskgit" else "audio_codec", "tiny")
    tokenizer.save_pretrained(tmp_path / "tok")
    extra = {"clip_seconds": 0.05} if kind == "magnet" else {}
    if kind == "maskgit":
        batch = {"tokens": torch.randint(0, tokenizer.vocab_size, (3, 8, 8))}
    else:
        batch = {"codes": torch.randint(0, tokenizer.vocab_size, (3, 4, 4))}
    results = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        model = build_model(kind, "tiny", tokenizer=str(tmp_path / "tok"), cond="none", label_smoothing=0.1,
                            loss_chunk=chunk, **extra).double()
        torch.manual_seed(1)  # the same mask ratio, mask and stage for both
        loss, logs = model.loss(dict(batch))
        loss.backward()
        results.append((loss.item(), logs["acc"].item(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_acc, plain_grads), (fused, fused_acc, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-6) and fused_acc == pytest.approx(plain_acc)
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("scale_weights,kernel", [([], "torch"), ([4.0, 1.0, 1.0, 2.0], "torch"),
                                                  ([4.0, 1.0, 1.0, 2.0], "compiled")])
def test_next_scale_fused_loss_matches_plain(scale_weights, kernel, tmp_path):
    """loss_chunk on VAR (eager or compiled chunks): the same scale-weighted loss, per-scale logs,
    accuracy and gradients."""
    torch.manual_seed(0)
    tokenizer = build_model("multiscale_vq", "tiny")
    tokenizer.save_pretrained(tmp_path / "msvq")
    batch = {"tokens": torch.randint(0, tokenizer.vocab_size, (3, sum(s * s for s in tokenizer.config.scales))),
             "class": torch.tensor([0, 1, 2])}
    results = []
    for chunk in (0, 9):
        torch.manual_seed(0)
        model = build_model("next_scale", "tiny", tokenizer=str(tmp_path / "msvq"), cond="class", num_classes=3,
                            cond_drop=0.0, label_smoothing=0.1, scale_loss_weights=scale_weights,
                            loss_chunk=chunk, loss_kernel=kernel if chunk else "torch").double()
        loss, logs = model.loss(dict(batch))
        loss.backward()
        results.append((loss.item(), {k: float(v) for k, v in logs.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_logs, plain_grads), (fused, fused_logs, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-6)
    assert fused_logs == pytest.approx(plain_logs, rel=1e-6) and "ce_s3" in fused_logs
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_liger_kernel_matches_the_torch_fused_path_in_the_triton_interpreter():
    """loss_kernel=liger (liger-kernel's Triton kernel, run by Triton's CPU interpreter here): the same
    loss, logs and gradients as the PyTorch path, for the plain, smoothed + z-loss and row-weighted
    cross-entropy, and through VAR's scale-weighted loss."""
    run_interpreted("""
        import tempfile, torch
        import liger_kernel.transformers.functional as liger
        from tessera.nn.fused_cross_entropy import fused_linear_cross_entropy, weighted_linear_cross_entropy
        calls = []
        real = liger.liger_fused_linear_cross_entropy
        liger.liger_fused_linear_cross_entropy = lambda *a, **k: calls.append(1) or real(*a, **k)
        from tessera.registry import build_model
        torch.manual_seed(0)
        h = torch.randn(37, 24, requires_grad=True)
        weight = torch.randn(101, 24, requires_grad=True)
        target = torch.randint(0, 101, (37,))
        rows = torch.rand(37)
        for smoothing, z_loss in ((0.0, 0.0), (0.1, 1e-3)):
            results = []
            for kernel in ("torch", "liger"):
                loss, logs = fused_linear_cross_entropy(h, weight, target, smoothing, z_loss, 8, kernel)
                weighted, per_row, _, correct = weighted_linear_cross_entropy(h, weight, target, rows, smoothing,
                                                                              z_loss, 8, kernel)
                grads = torch.autograd.grad(loss + weighted, (h, weight))
                results.append((loss, weighted, per_row, correct, logs, grads))
            (l0, w0, r0, c0, g0, d0), (l1, w1, r1, c1, g1, d1) = results
            torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
            assert c1 == c0 and set(g1) == set(g0)
            for key in g0:
                torch.testing.assert_close(g1[key], g0[key], rtol=1e-5, atol=1e-6)
            for a, b in zip(d1, d0):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        folder = tempfile.mkdtemp()
        build_model("multiscale_vq", "tiny").save_pretrained(folder + "/msvq")
        batch = {"tokens": torch.randint(0, 256, (2, 85)), "class": torch.tensor([0, 1])}  # scales 1, 2, 4, 8
        out = []
        for kernel in ("torch", "liger"):
            torch.manual_seed(0)
            model = build_model("next_scale", "tiny", tokenizer=folder + "/msvq", cond="class", num_classes=3,
                                cond_drop=0.0, label_smoothing=0.1, loss_chunk=16, loss_kernel=kernel)
            loss, logs = model.loss(dict(batch))
            loss.backward()
            out.append((loss, logs, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
        assert out[1][1].keys() == out[0][1].keys()
        for name, grad in out[0][2].items():
            torch.testing.assert_close(out[1][2][name], grad, rtol=1e-4, atol=1e-5)
        assert len(calls) == 5, calls  # 2 x 2 direct calls and VAR's: the liger kernel did run
    """)


def test_compile_mode_and_tuning_reach_every_block(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Block, "compile", lambda self, *args, **kwargs: calls.append(kwargs))
    recipe = tiny_recipe(tmp_path, images=8, train={"steps": 1, "ckpt_every": 1})
    train(recipe.with_overrides([f"out={tmp_path / 'run'}", "train.compile=true", "train.compile_tuning=false",
                                 "train.compile_mode=max-autotune-no-cudagraphs"]), progress=False)
    assert calls and all(kwargs == {"mode": "max-autotune-no-cudagraphs"} for kwargs in calls)
    calls.clear()
    assert recipe.train.compile_tuning  # on by default
    train(recipe.with_overrides([f"out={tmp_path / 'tuned'}", "train.compile=true",
                                 "train.compile_mode=reduce-overhead"]), progress=False)
    assert calls and all(kwargs == {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
                         for kwargs in calls)
    calls.clear()
    assert not recipe.train.compile_pdl  # off by default
    train(recipe.with_overrides([f"out={tmp_path / 'pdl'}", "train.compile=true", "train.compile_tuning=false",
                                 "train.compile_pdl=true"]), progress=False)
    assert calls and all(kwargs == {"options": {"triton.enable_pdl": True}} for kwargs in calls)
    with pytest.raises(ConfigError, match="compile_mode"):
        recipe.with_overrides(["train.compile_mode=fastest"])
