"""bench/train_step_profile.py's idle-gap attribution, on a hand-made chrome trace."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_step_profile import idle_gaps  # noqa: E402


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
    gaps = idle_gaps(trace, steps=1)
    assert gaps["idle_ms_per_step"] == pytest.approx(0.175)
    assert gaps["short_gaps_ms_per_step"] == pytest.approx(0.005) and gaps["device_events_per_step"] == 4
    assert gaps["span_ms_per_step"] == pytest.approx(0.31)
    assert [(row["op"], row["idle_ms_per_step"]) for row in gaps["by_op"]] == [
        ("aten::mm < MmBackward0", pytest.approx(0.1)), ("aten::copy_", pytest.approx(0.075))]
    assert idle_gaps({"traceEvents": []}, steps=1)["by_op"] == []
