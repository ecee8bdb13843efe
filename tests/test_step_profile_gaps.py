"""bench/train_step_profile.py's GPU timeline and attribution, on hand-made chrome traces."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_step_profile import device_timeline, time_by_source  # noqa: E402


def _event(cat: str, name: str, ts: float, dur: float, tid: int = 1, correlation: int | None = None) -> dict:
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_idle_gaps_are_charged_to_the_ops_that_launched_the_next_work():
    trace = {"traceEvents": [
        _event("kernel", "k0", 0, 50, tid=7, correlation=1),
        _event("kernel", "k1", 150, 50, tid=7, correlation=2),   # 100 us idle before it
        _event("kernel", "k2", 205, 20, tid=7, correlation=3),   # 5 us: below the threshold
        _event("gpu_memcpy", "copy", 300, 10, tid=7, correlation=4),  # 75 us idle
        _event("cpu_op", "MmBackward0", 100, 60),
        _event("cpu_op", "aten::mm", 120, 30),
        _event("cuda_runtime", "cudaLaunchKernel", 130, 5, correlation=2),
        _event("cpu_op", "aten::copy_", 280, 20),
        _event("cuda_runtime", "cudaMemcpyAsync", 290, 5, correlation=4),
    ]}
    gaps = device_timeline(trace, steps=1)
    assert gaps["idle_ms_per_step"] == pytest.approx(0.175)
    assert gaps["short_gaps_ms_per_step"] == pytest.approx(0.005) and gaps["device_events_per_step"] == 4
    assert gaps["span_ms_per_step"] == pytest.approx(0.31)
    assert [(row["op"], row["idle_ms_per_step"]) for row in gaps["by_op"]] == [
        ("aten::mm < MmBackward0", pytest.approx(0.1)), ("aten::copy_", pytest.approx(0.075))]
    assert gaps["busy"] == [("k0", 50, 1), ("k1", 50, 1), ("k2", 20, 1), ("copy", 10, 1)]
    assert device_timeline({"traceEvents": []}, steps=1)["by_op"] == []


def test_gpu_time_is_charged_to_the_innermost_repository_line_around_its_launch():
    trace = {"traceEvents": [
        _event("python_function", "src/tessera/generators/next_scale.py(90): forward", 0, 100),
        _event("python_function", "src/tessera/nn/layers.py(47): forward", 10, 30),
        _event("python_function", "torch/nn/functional.py(2000): silu", 15, 10),  # not ours: skipped
        _event("python_function", "src/tessera/nn/layers.py(61): forward", 50, 10),  # ends before the 2nd launch
        _event("cuda_runtime", "cudaLaunchKernel", 20, 2, correlation=1),
        _event("cuda_runtime", "cudaLaunchKernel", 70, 2, correlation=2),
        _event("cuda_runtime", "cudaLaunchKernel", 200, 2, correlation=3),
        _event("kernel", "silu", 30, 40, tid=7, correlation=1),
        _event("kernel", "loss", 80, 60, tid=7, correlation=2),
        _event("kernel", "other", 210, 6, tid=7, correlation=3),
    ]}
    rows = time_by_source(trace, steps=2)
    assert rows == [{"site": "generators/next_scale.py(90): forward", "ms_per_step": pytest.approx(0.03)},
                    {"site": "nn/layers.py(47): forward", "ms_per_step": pytest.approx(0.02)},
                    {"site": "(no repository frame)", "ms_per_step": pytest.approx(0.003)}]
