"""Timing and reporting helpers shared by the benchmarks in bench/."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def kernel_bench_parser(doc: str, batch: int) -> argparse.ArgumentParser:
    """The arguments every kernel benchmark takes: --device, --batch, --warmup, --reps, --json."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    return ap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds for one call: CUDA events on GPU (synchronized before and after), perf_counter on CPU."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict[str, Any]:
    """First-call seconds (compilation lands here), then the median of `reps` timed calls after
    `warmup - 1` more untimed ones; also returns the last output."""
    t0 = time.perf_counter()
    _, out = timed_call(fn, device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        timed_call(fn, device)
    times = []
    for _ in range(reps):
        seconds, out = timed_call(fn, device)
        times.append(seconds)
    return {"first_call_s": first, "times_s": times, "median_s": statistics.median(times), "output": out}


def environment(device: str) -> dict[str, Any]:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": device}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
