"""Next-token sampling throughput: tessera vs LlamaGen's own `generate()`, eager and compiled.

Class-conditional raster sampling at LlamaGen's shapes (GPT-L: 24 layers, width 1024, 16 heads;
GPT-B: 12 / 768 / 12), vocab 16384, 16x16 = 256 tokens, 1 class token, CFG as a doubled batch,
random weights, temperature 1 / top-k 0 / top-p 1. Only token generation is timed (no VQ
decode). Every row runs in this one process: build, one untimed first call (compile and
CUDA-graph capture land here; its wall time is reported), more warm-up calls, then `--reps`
timed calls (CUDA events around each, with a synchronize before and after); the table reports
the median as images per second (batch / median seconds).

GPU machine (H100), from the repo root, carrying `.peers` (LlamaGen's files, see
bench/peers/llamagen.py); about 5-7 minutes for gpt-l, most of it compilation:

    source .whl/setup.sh; PYTHONUNBUFFERED=1 python3 bench/next_token_sampling.py --shape gpt-l --json $OUT/next_token_bench.json

(`--shape gpt-b` for GPT-B; `--rows tessera-compiled,llamagen-compiled` for a subset.) The
script puts the repo's `src/` on sys.path itself. The JSON is rewritten after every row, so a
run cut short still leaves the rows it finished.

CPU smoke test (tiny shapes, eager rows only unless `--rows` names others):

    .venv/bin/python bench/next_token_sampling.py --device cpu --shape tiny

Reference, LlamaGen measured once on an H100: GPT-L 13 img/s eager, 92 compiled; GPT-B 27 / 201.
tessera's goal: compiled >= 1.5x LlamaGen compiled.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

_BENCH = Path(__file__).resolve().parent
_REPO = _BENCH.parent
for _p in (_REPO / "src", _BENCH):
    if _p.is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from peers import llamagen  # noqa: E402
from timing import environment, timed_call, write_json  # noqa: E402

ROWS = ("tessera-eager", "tessera-compiled", "tessera-compiled-kv64", "tessera-compiled-qknorm", "llamagen-eager",
        "llamagen-compiled")
# Run order: both eager rows first, then the compiled rows (compilation state never leaks
# into an eager measurement). tessera-compiled attends over the whole static cache (one CUDA
# graph; the decode kernel reads only the written slots); tessera-compiled-kv64 slices the cache
# into 64-slot buckets (one graph per bucket). tessera's model matches LlamaGen's GPT-L
# architecture (no QK-norm, SwiGLU hidden width a multiple of 256: 2816); the -qknorm row
# switches on tessera's default QK-norm (two more reductions per block).
RUN_ORDER = ("tessera-eager", "llamagen-eager", "tessera-compiled", "llamagen-compiled", "tessera-compiled-qknorm",
             "tessera-compiled-kv64")
LLAMAGEN_ARCHITECTURE = {"qk_norm": False, "multiple_of": 256}


@dataclass
class Shape:
    tessera_preset: str
    llamagen_model: str | None  # GPT_models key; None: explicit ModelArgs below
    vocab_size: int
    grid_size: int
    num_classes: int
    batch: int
    llamagen_args: dict[str, Any] | None = None
    reference: dict[str, float] = field(default_factory=dict)  # LlamaGen img/s measured once on an H100


SHAPES = {
    "gpt-l": Shape("gpt-l", "GPT-L", 16384, 16, 1000, 64,
                   reference={"llamagen-eager": 13.0, "llamagen-compiled": 92.0}),
    "gpt-b": Shape("gpt-b", "GPT-B", 16384, 16, 1000, 64,
                   reference={"llamagen-eager": 27.0, "llamagen-compiled": 201.0}),
    # CPU smoke: tessera's `tiny` preset (2 layers, width 64, 4 heads) and a matching LlamaGen.
    "tiny": Shape("tiny", None, 256, 4, 10, 2, llamagen_args={"dim": 64, "n_layer": 2, "n_head": 4}),
}
GOAL = 1.5  # tessera compiled / LlamaGen compiled
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----- the two sides ----------------------------------------------------------------------------
def build_tessera(shape: Shape, args, compile: bool, kv_bucket: int | None,
                  qk_norm: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    from tessera.registry import build_model
    from tessera.samplers.autoregressive import AutoregressiveSampler
    from tessera.samplers.logits import SamplingConfig

    kwargs: dict[str, Any] = {"use_cache": True}
    params = inspect.signature(AutoregressiveSampler.__init__).parameters
    if compile:
        if "compile" not in params:
            raise RuntimeError("tessera's AutoregressiveSampler has no `compile=` argument yet (the CUDA-graph'd "
                               "decode step); the tessera-compiled row needs it")
        kwargs["compile"] = True
    if kv_bucket is not None:
        kwargs["kv_bucket"] = kv_bucket
    torch.manual_seed(args.seed)
    model = build_model("next_token", shape.tessera_preset, vocab_size=shape.vocab_size,
                        grid_size=shape.grid_size, num_classes=shape.num_classes,
                        trunk={**LLAMAGEN_ARCHITECTURE, "qk_norm": qk_norm})
    model = model.to(args.device, args.torch_dtype).eval()
    settings = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, cfg=args.cfg, seed=args.seed)
    sampler = AutoregressiveSampler(settings, **kwargs)
    info = {"params": sum(p.numel() for p in model.parameters()),
            "sampler": {k: v for k, v in kwargs.items()}, "attention": model.config.trunk.attention,
            "qk_norm": qk_norm, "mlp_hidden": model.trunk.blocks[0].mlp.w2.in_features}
    return (lambda labels: sampler(model, labels)), info


def build_llamagen(shape: Shape, args, compile: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    peer_shape = llamagen.LlamaGenShape(shape.llamagen_model, shape.vocab_size, shape.grid_size,
                                        shape.num_classes, shape.llamagen_args)
    sampler = llamagen.LlamaGenSampler(
        peer_shape, device=args.device, dtype=args.torch_dtype, cfg_scale=args.cfg, temperature=1.0, top_k=0,
        top_p=1.0, compile=compile, compile_mode=args.llamagen_compile, llamagen_dir=args.llamagen_dir,
        seed=args.seed)
    info = {"params": sampler.n_params, "model": shape.llamagen_model or "ModelArgs", "model_args": shape.llamagen_args,
            "compile_mode": args.llamagen_compile if compile else None}
    return sampler, info


def check_tokens(tokens: torch.Tensor, shape: Shape, batch: int) -> torch.Tensor:
    flat = tokens.reshape(tokens.shape[0], -1)
    n = shape.grid_size ** 2
    if tuple(flat.shape) != (batch, n):
        raise RuntimeError(f"expected {batch}x{n} tokens, got shape {tuple(tokens.shape)}")
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= shape.vocab_size:
        raise RuntimeError(f"token ids out of range [0, {shape.vocab_size}): min {lo}, max {hi}")
    return flat.long().cpu()


def run_row(name: str, shape: Shape, args, log) -> dict[str, Any]:
    side, mode, *variant = name.split("-")
    compile = mode == "compiled"
    buckets = [int(v[2:]) for v in variant if v.startswith("kv")]
    kv_bucket = buckets[0] if buckets else (args.kv_bucket if compile else None)
    device = torch.device(args.device)
    row: dict[str, Any] = {"row": name, "status": "ok"}
    t_build = time.perf_counter()
    if compile:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    if side == "tessera":
        fn, info = build_tessera(shape, args, compile, kv_bucket, qk_norm="qknorm" in variant)
    else:
        fn, info = build_llamagen(shape, args, compile)
    row.update(info)
    row["build_s"] = time.perf_counter() - t_build
    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, shape.num_classes, (args.batch,), generator=gen).to(device)
    call = lambda: fn(labels)  # noqa: E731

    with torch.no_grad():
        t0 = time.perf_counter()
        _, tokens = timed_call(call, device)
        row["first_call_s"] = time.perf_counter() - t0  # includes compilation and graph capture
        row["tokens"] = check_tokens(tokens, shape, args.batch)
        log(f"  {name}: first call {row['first_call_s']:.1f} s")
        for _ in range(max(args.warmup - 1, 0)):
            timed_call(call, device)
        times = []
        for _ in range(args.reps):
            seconds, _ = timed_call(call, device)
            times.append(seconds)
    row["times_s"] = times
    if compile:  # how many graphs were compiled, and whether CUDA graphs were skipped (and why)
        counters = torch._dynamo.utils.counters
        row["compile_counters"] = {group: dict(counters[group]) for group in ("stats", "inductor", "graph_break")
                                   if counters[group]}
    row["median_s"] = statistics.median(times)
    row["img_per_s"] = args.batch / row["median_s"]
    log(f"  {name}: median {row['median_s']:.3f} s/batch = {row['img_per_s']:.1f} img/s "
        f"(min {min(times):.3f}, max {max(times):.3f})")
    return row


# ----- output -----------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = {r["row"]: r for r in result["rows"]}
    ref = result["reference_img_per_s"]
    base = rows.get("llamagen-compiled", {}).get("img_per_s")
    lines = [
        f"Next-token sampling, shape {cfg['shape']}: batch {cfg['batch']} (x2 for CFG {cfg['cfg']}), "
        f"{cfg['n_tokens']} tokens, vocab {cfg['vocab_size']}, {cfg['dtype']}, random weights, "
        f"top-k 0 / top-p 1 / temperature 1; median of {cfg['reps']} after {cfg['warmup']} warm-up call(s); "
        f"{result['env'].get('gpu', cfg['device'])}, torch {result['env']['torch']}",
        "",
        "| row | img/s | s/batch (median) | min / max s | first call s (incl. compile) | params (M) "
        "| x LlamaGen compiled | LlamaGen ref img/s (H100) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else ""
        ref_s = f"{ref[name]:g}" if name in ref else ""
        if r["status"] == "ok":
            ratio = f"{r['img_per_s'] / base:.2f}" if base else ""
            lines.append(f"| {name} | {r['img_per_s']:.1f} | {r['median_s']:.3f} | {min(r['times_s']):.3f} / "
                         f"{max(r['times_s']):.3f} | {r['first_call_s']:.1f} | {params} | {ratio} | {ref_s} | ok |")
        else:
            msg = r["status"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {name} | | | | | {params} | | {ref_s} | {msg} |")
    t, b = rows.get("tessera-compiled", {}), rows.get("llamagen-compiled", {})
    if t.get("status") == "ok" and b.get("status") == "ok":
        speedup = t["img_per_s"] / b["img_per_s"]
        lines += ["", f"tessera compiled / LlamaGen compiled = {speedup:.2f}x (goal >= {GOAL}x: "
                      f"{'met' if speedup >= GOAL else 'not met'})"]
    if "tokens_match_eager" in t:
        lines.append(f"tessera compiled vs eager, same seed: {100 * t['tokens_match_eager']:.1f}% of tokens equal "
                     f"({100 * t['first_token_match_eager']:.1f}% of first tokens; later tokens diverge once a "
                     "sample differs, and bf16 kernels differ)")
    return "\n".join(lines)


# ----- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt-l")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="images per call (default: the shape's, 64 for gpt-*)")
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale (> 1 doubles the batch on both sides)")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated subset of {','.join(ROWS)} (default: all on CUDA, eager rows on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row (the first one compiles)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per row; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-bucket", type=int, default=0,
                   help="kv_bucket of the tessera-compiled row (0: whole cache; the -kv64 row uses 64)")
    p.add_argument("--decode-kernel", default=None, metavar="BLOCK,WARPS,PROGRAMS[,STAGES]",
                   help="launch settings of tessera's decode-attention kernel (default: nn/decode_attention.KERNEL)")
    p.add_argument("--llamagen-dir", default=str(_REPO / llamagen.DEFAULT_DIR))
    p.add_argument("--llamagen-compile", choices=llamagen.COMPILE_MODES, default="model",
                   help="model: torch.compile(model, mode='reduce-overhead', fullgraph=True) as LlamaGen's "
                        "sample_c2i.py --compile; decode: compile generate.decode_one_token (gpt-fast style)")
    p.add_argument("--json", default=None, help="write results here (rewritten after every row)")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.torch_dtype = DTYPES[args.dtype]
    args.batch = args.batch or shape.batch
    if args.rows is None:
        args.rows = list(ROWS) if device.type == "cuda" else [r for r in ROWS if r.endswith("eager")]
    else:
        args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in args.rows if r not in ROWS]
        if unknown:
            p.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    if args.warmup < 1 or args.reps < 1:
        p.error("--warmup and --reps must be >= 1")
    if args.decode_kernel:
        from tessera.nn import decode_attention
        decode_attention.KERNEL = decode_attention.DecodeKernelConfig(*map(int, args.decode_kernel.split(",")))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as LlamaGen's sample scripts; both sides alike
        torch.backends.cudnn.allow_tf32 = True
    result: dict[str, Any] = {
        "benchmark": "next_token_sampling",
        "config": {"shape": args.shape, "batch": args.batch, "cfg": args.cfg, "dtype": args.dtype,
                   "device": args.device, "n_tokens": shape.grid_size ** 2, "vocab_size": shape.vocab_size,
                   "num_classes": shape.num_classes, "warmup": args.warmup, "reps": args.reps, "seed": args.seed,
                   "temperature": 1.0, "top_k": 0, "top_p": 1.0, "llamagen_compile": args.llamagen_compile,
                   "kv_bucket": args.kv_bucket, "decode_kernel": args.decode_kernel, "timing": "cuda events" if torch.device(args.device).type == "cuda" else "perf_counter"},
        "env": environment(args.device),
        "reference_img_per_s": shape.reference,
        "rows": [],
    }
    tokens: dict[str, torch.Tensor] = {}
    for name in [r for r in RUN_ORDER if r in args.rows]:
        log(f"{name}: building and warming up")
        try:
            row = run_row(name, shape, args, log)
            tokens[name] = row.pop("tokens")
        except Exception as exc:  # record, keep going: one broken row must not hide the others
            traceback.print_exc()
            row = {"row": name, "status": f"error: {type(exc).__name__}: {exc}".split("\n")[0][:300]}
            log(f"  {name}: FAILED ({row['status']})")
        if name == "tessera-compiled" and "tessera-eager" in tokens and name in tokens:
            same = tokens[name] == tokens["tessera-eager"]
            row["tokens_match_eager"] = same.float().mean().item()
            row["first_token_match_eager"] = same[:, 0].float().mean().item()
        result["rows"].append(row)
        result["wall_s"] = time.perf_counter() - start
        write_json(args.json, result)
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    result["rows"].sort(key=lambda r: ROWS.index(r["row"]))
    result["wall_s"] = time.perf_counter() - start
    result["markdown"] = markdown(result)
    write_json(args.json, result)
    log(f"done in {result['wall_s']:.0f} s")
    print(result["markdown"], flush=True)
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(0 if all(r["status"] == "ok" for r in out["rows"]) else 1)
