"""Where one training step of VAR-d16's shape spends its GPU time: the model `train_throughput.py`
trains (next-scale, 16 layers, width 1024, 680 tokens, text condition through AdaLN), random token
maps instead of shards, compiled trunk, bf16 autocast, and the trainer's per-step work around the
model: gradient clipping, the on-device non-finite skip, fused AdamW, the EMA and the logged sums.
After warm-up, `--steps` steps are timed on the wall clock (the GPU waited for once, at the end),
then torch.profiler records as many; the CUDA kernel time is grouped (matrix multiplies, attention,
everything else: norms, AdaLN, RoPE, elementwise, optimizer, EMA) and the top kernels are listed.
Wall time minus kernel time is the time the GPU waits for the host; on a GPU the idle gaps are
listed by the CPU ops that launched the work after them (where the host fell behind). The profiler
slows the host, so under it the idle time is larger than the unprofiled wall-minus-kernel time:
read the list as a ranking, not as the gap itself. `--sync-debug` also runs one step under CUDA's
sync debug mode and lists the places where the host waits for the GPU.

GPU:  source .whl/setup.sh; python3 bench/train_step_profile.py --json $OUT/profile.json
CPU smoke:  .venv/bin/python bench/train_step_profile.py --shape tiny --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from timing import environment, write_json  # noqa: E402

from tessera.train.ema import EMA  # noqa: E402
from tessera.train.step_guard import LoggedMeans, NonFiniteSteps, arm_skip, finite_flag  # noqa: E402
from tessera.train.trainer import compile_arguments  # noqa: E402
from train_throughput import SHAPES  # noqa: E402

CAPTION = "a red circle left of a blue square"
STEP_RANGE = "tessera_profiled_step"  # the profiler annotation around each profiled step
GROUPS = {"matmul": ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "addmm", "mm_"),
          "attention": ("flash", "fmha", "attention", "cudnn", "sdpa", "efficient")}  # incl. _prefix_attention_*


def build(shape: dict[str, Any], loss_chunk: int, device: torch.device,
          trunk: dict[str, Any] | None = None, loss_kernel: str = "torch", tuning: bool = False,
          pdl: bool = False) -> torch.nn.Module:
    """The next-scale generator of `train_throughput.py`'s recipe, on `device`, trunk compiled (with
    Inductor's coordinate-descent tuning if `tuning`, programmatic dependent launch if `pdl`); `trunk`
    overrides trunk settings."""
    from tessera.registry import build_model
    from tessera.tokenizers.text import train_text_tokenizer
    torch.manual_seed(0)
    msvq = build_model("multiscale_vq", shape["msvq"], image_size=shape["image_size"], scales=shape["scales"],
                       **shape["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        msvq.save_pretrained(Path(tmp) / "msvq")
        train_text_tokenizer(iter([CAPTION] * 8), vocab_size=256, out_path=Path(tmp) / "text.json")
        model = build_model("next_scale", None, tokenizer=str(Path(tmp) / "msvq"), cond="text",
                            text_tokenizer=str(Path(tmp) / "text.json"), loss_chunk=loss_chunk,
                            loss_kernel=loss_kernel if loss_chunk else "torch",
                            trunk={**shape["trunk"], **(trunk or {})})
    model.to(device).train()
    model.trunk.compile(**compile_arguments("default", tuning, pdl))
    return model


ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def timed_steps(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float, dict[str, float]]:
    """Wall milliseconds per step over `steps` steps, waiting for the GPU only before and after; the
    host's own milliseconds per step (inside `step`, the GPU not waited for at the end); and per
    step, how often the caching allocator went to the driver (cudaMalloc/cudaFree, which waits for
    the device) or freed its cache to retry an allocation."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = torch.cuda.memory_stats() if device.type == "cuda" else {}
    start, host = time.perf_counter(), 0.0
    for _ in range(steps):
        step_start = time.perf_counter()
        step()
        host += time.perf_counter() - step_start
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    after = torch.cuda.memory_stats() if device.type == "cuda" else {}
    return wall_ms, host * 1e3 / steps, {k: (after.get(k, 0) - before.get(k, 0)) / steps
                                         for k in ALLOCATOR_EVENTS if k in after}


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _launches(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The trace's CUDA runtime calls (launches) by correlation id, which their device events carry."""
    return {e["args"]["correlation"]: e for e in events
            if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}


def device_timeline(trace: dict[str, Any], steps: int, min_us: float = 10.0, top: int = 12) -> dict[str, Any]:
    """The GPU's work per step from a chrome trace: the time of each kernel, copy and memset by name
    (`busy`: (name, total us, count)), and its idle time. Each gap of `min_us` or more between device
    events is charged to the two innermost CPU ops around the launch of the work that ends it; the gaps
    below `min_us` (one kernel waiting for the one before it, with the host ahead) are summed apart,
    with the number of device events per step and the time from the first one's start to the last one's end;
    `idle_ms_by_step` splits the long gaps by the step (a `STEP_RANGE` annotation) that launched the work
    ending them (the first step starts from an idle GPU after a sync)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    busy: dict[str, list[float]] = {}
    for event in device:
        total, count = busy.get(event["name"], [0.0, 0])
        busy[event["name"]] = [total + event["dur"], count + 1]
    result = {"busy": sorted(((name, t, n) for name, (t, n) in busy.items()), key=lambda row: -row[1])}
    if not device:
        return {**result, "idle_ms_per_step": 0.0, "short_gaps_ms_per_step": 0.0, "device_events_per_step": 0.0,
                "span_ms_per_step": 0.0, "idle_ms_by_step": [], "by_op": []}
    launches = _launches(events)
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    step_starts = sorted(e["ts"] for e in events if e.get("name") == STEP_RANGE and e.get("cat") == "user_annotation")
    by_step = [0.0] * max(len(step_starts), 1)
    charged: dict[str, list[float]] = {}
    end, idle_total, short_total = device[0]["ts"] + device[0]["dur"], 0.0, 0.0
    for event in device[1:]:
        idle = event["ts"] - end
        if 0 < idle < min_us:
            short_total += idle
        if idle >= min_us:
            idle_total += idle
            launch = launches.get(event.get("args", {}).get("correlation"))
            if launch and step_starts:
                by_step[max(bisect.bisect_right(step_starts, launch["ts"]) - 1, 0)] += idle
            inside = sorted((op for op in ops if launch and op["tid"] == launch["tid"]
                             and op["ts"] <= launch["ts"] <= op["ts"] + op["dur"]), key=lambda op: op["dur"])
            name = " < ".join(op["name"][:60] for op in inside[:2]) or "(no launching op found)"
            total, count = charged.get(name, [0.0, 0])
            charged[name] = [total + idle, count + 1]
        end = max(end, event["ts"] + event["dur"])
    by_op = sorted(charged.items(), key=lambda item: -item[1][0])[:top]
    return {**result, "idle_ms_per_step": idle_total / 1e3 / steps, "short_gaps_ms_per_step": short_total / 1e3 / steps,
            "device_events_per_step": len(device) / steps, "span_ms_per_step": (end - device[0]["ts"]) / 1e3 / steps,
            "idle_ms_by_step": [t / 1e3 for t in by_step],
            "by_op": [{"op": name, "idle_ms_per_step": t / 1e3 / steps, "gaps_per_step": n / steps}
                      for name, (t, n) in by_op]}


def time_by_source(trace: dict[str, Any], steps: int, top: int = 30) -> list[dict[str, Any]]:
    """GPU milliseconds per step by the innermost line of this repository's code (from a trace recorded
    with `with_stack=True`) that was running when each kernel, copy or memset was launched."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    frames: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("cat") == "python_function" and ("tessera/" in e["name"] or "bench/" in e["name"]):
            frames.setdefault(e["tid"], []).append(e)
    for fs in frames.values():
        fs.sort(key=lambda f: f["ts"])
    starts = {tid: [f["ts"] for f in fs] for tid, fs in frames.items()}
    launches = _launches(events)
    charged: Counter[str] = Counter()
    for event in events:
        if event.get("cat") not in DEVICE_CATEGORIES:
            continue
        launch = launches.get(event.get("args", {}).get("correlation"))
        site = "(no repository frame)"
        if launch and launch["tid"] in frames:
            fs, i = frames[launch["tid"]], bisect.bisect_right(starts[launch["tid"]], launch["ts"]) - 1
            while i >= 0 and fs[i]["ts"] + fs[i]["dur"] < launch["ts"]:  # the latest-starting frame around it
                i -= 1
            if i >= 0:
                site = fs[i]["name"].split("tessera/")[-1]
        charged[site] += event["dur"]
    return [{"site": site, "ms_per_step": t / 1e3 / steps} for site, t in charged.most_common(top)]


def sync_sites(step: Callable[[], None]) -> list[dict[str, Any]]:
    """Where one step makes the host wait for the GPU: run it under CUDA's sync debug mode and
    count each synchronizing call by the innermost frames of this repository on its stack."""
    sites: Counter[str] = Counter()

    stepping = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if not stepping or "synchroniz" not in str(message):  # warnings from outside the step, or of other kinds
            return
        ours = [f for f in traceback.extract_stack()[:-1] if str(_BENCH.parent) in f.filename]
        sites[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(ours[-3:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stepping.append(True)
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"site": site, "syncs": n} for site, n in sites.most_common()]


def group(name: str) -> str:
    lowered = name.lower()
    return next((g for g, keys in GROUPS.items() if any(k in lowered for k in keys)), "other")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="d16")
    p.add_argument("--batch", type=int, default=None, help="default: the shape's batch")
    p.add_argument("--loss-chunk", type=int, default=8192, help="0: full logits")
    p.add_argument("--loss-kernel", default="torch", help="model.config.loss_kernel with --loss-chunk > 0")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--group-rows", type=int, default=0, help="trunk.attention_group_rows under --attention sdpa (0: one call, dense mask)")
    p.add_argument("--attention", default="auto", help="trunk.attention (auto: the prefix kernels for this mask)")
    p.add_argument("--plain-qk-rope", action="store_true", help="QK-norm and RoPE as plain ops, not the Triton kernel")
    p.add_argument("--bf16-residual", action="store_true", help="trunk.bf16_residual: the residual stream in bf16")
    p.add_argument("--plain-swiglu", action="store_true", help="trunk.fused_swiglu=false: SwiGLU as plain ops")
    p.add_argument("--plain-residual-norm", action="store_true",
                   help="trunk.fused_residual_norm=false: the gated residual and modulated norm compiled by Inductor")
    p.add_argument("--compile-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="train.compile_tuning: Inductor's coordinate-descent tuning (the trainer's default: on)")
    p.add_argument("--pdl", action="store_true", help="train.compile_pdl: Inductor's programmatic dependent launch")
    p.add_argument("--sync-debug", action="store_true", help="also list where a step waits for the GPU (CUDA only)")
    p.add_argument("--by-source", action="store_true", help="record Python stacks; GPU time by this repository's launching line")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(shape, args.loss_chunk, device, trunk={"fused_qk_rope": not args.plain_qk_rope,
                                                          "attention": args.attention,
                                                          "attention_group_rows": args.group_rows,
                                                          "bf16_residual": args.bf16_residual,
                                                          "fused_swiglu": not args.plain_swiglu,
                                                          "fused_residual_norm": not args.plain_residual_norm},
                  loss_kernel=args.loss_kernel, tuning=args.compile_tuning, pdl=args.pdl)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4,
                                  fused=True)
    b = args.batch or shape["batch"]
    batch = {"tokens": torch.randint(0, shape["tokenizer"].get("codebook_size", 16), (b, model.seq_len), device=device),
             "text": [CAPTION] * b, "step": 0}

    ema, bad_steps, window = EMA(model, 0.9999), NonFiniteSteps(max_bad=10), LoggedMeans()
    waits: list[float] = []  # host seconds spent judging the step before (waiting for its flag)

    def step() -> None:  # the trainer's step, without accelerate's wrappers (one process)
        with torch.autocast(device.type, torch.bfloat16):
            loss, logs = model(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        finite = finite_flag(norm, device)
        arm_skip(optimizer, finite)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, finite=finite)
        window.add({"loss": loss.detach(), "grad_norm": norm, **logs}, finite)
        judged = time.perf_counter()
        bad_steps.record(0, finite, loss)
        waits.append(time.perf_counter() - judged)

    for _ in range(args.warmup):
        step()
    waits.clear()
    wall_ms, host_ms, allocator = timed_steps(step, args.steps, device)
    wait_ms = sum(waits) * 1e3 / args.steps
    syncs = sync_sites(step) if args.sync_debug and device.type == "cuda" else None
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, with_stack=args.by_source and device.type == "cuda") as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function(STEP_RANGE):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        trace = json.loads((Path(tmp) / "trace.json").read_text())
    gaps = device_timeline(trace, args.steps)
    sources = time_by_source(trace, args.steps) if args.by_source else None
    # The trace's device events, not key_averages: on an H100 the latter's kernel time fell 14 ms per step
    # short of the busy time in the trace (kernels it does not attribute). On a CPU: the leaf ops.
    timed = [(t, name, n) for name, t, n in gaps.pop("busy")] if device.type == "cuda" else sorted(
        ((e.self_cpu_time_total, e.key, e.count) for e in prof.key_averages() if not e.cpu_children), reverse=True)
    total = sum(t for t, _, _ in timed) or 1.0
    per_step_ms = total / 1e3 / args.steps
    groups: dict[str, float] = {}
    for t, name, _ in timed:
        groups[group(name)] = groups.get(group(name), 0.0) + t / total
    result = {"benchmark": "train_step_profile", "shape": args.shape, "batch": b, "loss_chunk": args.loss_chunk,
              "loss_kernel": args.loss_kernel, "bf16_residual": args.bf16_residual,
              "fused_swiglu": not args.plain_swiglu, "fused_residual_norm": not args.plain_residual_norm,
              "compile_tuning": args.compile_tuning, "pdl": args.pdl,
              "attention": args.attention, "group_rows": args.group_rows, "plain_qk_rope": args.plain_qk_rope,
              "env": environment(device.type), "wall_ms_per_step": wall_ms, "host_ms_per_step": host_ms,
              "host_wait_ms_per_step": wait_ms, "allocator_per_step": allocator,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "kernel_ms_per_step": per_step_ms,
              "share": groups, "gpu_idle": gaps, "by_source": sources, "sync_sites": syncs,
              "top": [{"kernel": name[:160], "share": t / total, "calls_per_step": n / args.steps}
                      for t, name, n in timed[:args.top]]}
    print(f"per step: {wall_ms:.1f} ms wall, {per_step_ms:.1f} ms of kernels; "
          + ", ".join(f"{g} {s:.1%}" for g, s in groups.items()))
    print(f"host per step: {host_ms - wait_ms:.1f} ms queueing work (a full launch queue blocks here too), "
          f"{wait_ms:.1f} ms waiting for the step before (the GPU is behind when this is large)")
    if allocator:
        print("allocator per step: " + ", ".join(f"{k} {v:g}" for k, v in allocator.items()))
    for row in result["top"]:
        print(f"{row['share']:6.1%}  x{row['calls_per_step']:<6.0f} {row['kernel'][:120]}")
    print(f"under the profiler the GPU's work spans {gaps['span_ms_per_step']:.1f} ms per step; long gaps by step (ms): "
          + ", ".join(f"{t:.1f}" for t in gaps["idle_ms_by_step"]))
    print(f"GPU idle between its {gaps['device_events_per_step']:.0f} kernels and copies per step: "
          f"{gaps['short_gaps_ms_per_step']:.1f} ms in gaps under 10 us; {gaps['idle_ms_per_step']:.1f} ms in longer "
          "ones, by the op that launched the work after them:")
    for row in gaps["by_op"]:
        print(f"{row['idle_ms_per_step']:6.2f} ms  x{row['gaps_per_step']:<5.1f} {row['op'][:125]}")
    for row in sources or []:
        print(f"{row['ms_per_step']:7.2f} ms  {row['site'][:130]}")
    for row in syncs or []:
        print(f"host waits for the GPU x{row['syncs']}: {row['site']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
