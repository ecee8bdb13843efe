"""Trainer parts: EMA arithmetic, the lr schedule, checkpoint pruning and the latest pointer, and
skipping non-finite steps on the device."""
import math
import time
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tessera.registry import build_model
from tessera.train.ema import EMA
from tessera.train.schedule import warmup_cosine
from tessera.train.state import save_training_checkpoint
from tessera.train.step_guard import LoggedMeans, NonFiniteSteps, arm_skip, finite_flag


def test_ema_averages_and_codebook_follows_live_weights():
    model = build_model("vq", "tiny")
    ema = EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11) = 2/11
    live = model.trainable_state_dict()
    decay = 2 / 11
    key = "encoder.conv_in.weight" if "encoder.conv_in.weight" in live else next(
        k for k in live if k.startswith("encoder.") and k.endswith("weight"))
    torch.testing.assert_close(ema.state_dict()[key], decay * before[key] + (1 - decay) * live[key])
    codebook = next(k for k in live if k.startswith("quantizer.") and live[k].dtype.is_floating_point)
    torch.testing.assert_close(ema.state_dict()[codebook], live[codebook].float())


class _HostReads(TorchDispatchMode):
    """Counts tensor values read back to the host (`.item()`, `float(t)`, a tensor passed as a Python number):
    on a GPU each waits for every queued kernel."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_ema_update_reads_nothing_back_to_the_host():
    model = build_model("vq", "tiny")
    ema = EMA(model, decay=0.9)
    with _HostReads() as spy:
        ema.update(model, finite=torch.tensor(True))
        ema.update(model, finite=torch.tensor(False))
    assert spy.reads == 0
    assert ema.updates == 1


def test_warmup_then_cosine_to_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == 0.1
    assert warmup_cosine(9, 10, 100, 0.1) == 1.0
    assert math.isclose(warmup_cosine(55, 10, 100, 0.1), 0.1 + 0.9 * 0.5)
    assert math.isclose(warmup_cosine(100, 10, 100, 0.1), 0.1)


def test_checkpoints_are_pruned_and_latest_points_at_newest(tmp_path):
    model = build_model("vq", "tiny")
    ema = EMA(model, 0.9)
    for step in (1, 2, 3):
        save_training_checkpoint(tmp_path, model, ema.state_dict(), {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000003"


def test_a_non_finite_step_changes_neither_weights_nor_ema_and_is_judged_one_step_late():
    model = build_model("vq", "tiny")
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = {k: v.clone() for k, v in ema.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    finite = finite_flag(torch.tensor(float("nan")), torch.device("cpu"))
    arm_skip(optimizer, finite)
    optimizer.step()
    ema.update(model, finite=finite)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, shadow[k]) for k, v in ema.state_dict().items()) and ema.updates == 0
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())  # not counted as an Adam step

    steps = NonFiniteSteps(max_bad=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps.record(1, finite, torch.tensor(float("nan")))  # step 1 is not judged yet
    with pytest.warns(RuntimeWarning, match="step 1: loss nan, gradient norm not finite: skipped"):
        steps.record(2, torch.tensor(True), torch.tensor(0.5))
    steps.record(3, torch.tensor(False), torch.tensor(float("inf")))
    with pytest.warns(RuntimeWarning, match="step 3: .*1 in a row"):
        steps.record(4, torch.tensor(False), torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match="step 4: loss inf.*2 steps in a row"):
        steps.settle()
    with pytest.raises(TypeError, match="fused optimizer"):
        arm_skip(torch.optim.SGD(model.parameters(), lr=0.1), finite)


def test_logged_means_sum_in_float32_and_leave_out_skipped_steps():
    window = LoggedMeans()
    assert window.close().means() == {}
    window.add({"loss": torch.tensor(7.0, dtype=torch.bfloat16)}, torch.tensor(False))
    assert window.close().means() == {}  # only a skipped step: no means
    window.add({"loss": torch.tensor(9.0), "grad_norm": 5.0}, torch.tensor(False))  # skipped: weighs 0
    for step in range(10):
        window.add({"loss": torch.tensor(6.7 + 0.01 * step, dtype=torch.bfloat16), "grad_norm": 2.0},
                   torch.tensor(True))
    expected = float(sum(torch.tensor(6.7 + 0.01 * s, dtype=torch.bfloat16).float() for s in range(10))) / 10
    closed = window.close()
    window.add({"loss": torch.tensor(1.0), "grad_norm": 1.0}, torch.tensor(True))  # the next window
    means = closed.means()
    assert means["loss"] == pytest.approx(expected, abs=1e-5) and means["grad_norm"] == 2.0
    assert window.close().means() == {"loss": 1.0, "grad_norm": 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy off the GPU is what is tested; the CPU test above covers the sums")
def test_logged_means_close_a_gpu_window_without_waiting_for_it():
    window, device = LoggedMeans(), torch.device("cuda")
    window.add({"loss": torch.tensor(1.0, device=device)}, torch.tensor(True, device=device))
    window.close().means()  # the first pinned host block is allocated (cudaHostAlloc may wait); later ones are reused
    losses, finite = torch.tensor([3.0, 5.0], device=device), torch.tensor(True, device=device)
    window.add({"loss": losses[0]}, finite)
    torch.cuda._sleep(int(1e9))  # GPU work queued after the step (a tensor made from a number here would wait for it)
    window.add({"loss": losses[1]}, finite)
    host_start = time.perf_counter()
    closed = window.close()
    closing = time.perf_counter() - host_start
    waiting = time.perf_counter()
    assert closed.means() == {"loss": 4.0}
    assert closing < 0.1 * (time.perf_counter() - waiting)  # closing did not wait; reading did
