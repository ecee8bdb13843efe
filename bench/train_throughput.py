"""Training throughput of the real trainer (`tessera train`) at VAR-d16's shape: tokens/s, model
TFLOP/s, MFU against the GPU's stated bf16 peak, and peak memory, for the plain and fast paths
and under each launch config (single process, DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3).

Shape `d16`: a next-scale generator with VAR-d16's trunk (16 layers, width 1024, 16 heads; text
condition through AdaLN), a random-weight multi-scale VQ at 256px (scales 1,2,3,4,5,6,8,10,13,16
= 680 tokens, 4,096 codes), trained from pre-tokenized shards (64px shapes scenes resized to 256px
and encoded once by `tessera data tokenize`), bf16 autocast, fused AdamW. Each row runs the
trainer for `--steps` steps and reports the last logging window, so compilation is excluded.

GPU:  source .whl/setup.sh; python3 bench/train_throughput.py --json $OUT/train_bench.json
      (--runs single:plain,single:fused,ddp:plain,zero2:plain,zero3:plain picks launch:row pairs;
       launch:row:N runs that pair on N GPUs, e.g. --runs single:fused,ddp:fused:2,zero2:fused:2;
       --work DIR keeps the tokenizer and shards for the next call on the same machine)
CPU smoke:  .venv/bin/python bench/train_throughput.py --shape tiny --rows plain --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
_ROOT = _BENCH.parent
for _p in (_ROOT / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from timing import environment, write_json  # noqa: E402

SHAPES = {
    "d16": {"trunk": {"dim": 1024, "n_layers": 16, "n_heads": 16}, "image_size": 256, "msvq": "var16",
            "scales": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "tokenizer": {"codebook_size": 4096, "code_dim": 32},
            "batch": 32, "images": 2048},
    "tiny": {"trunk": {"dim": 64, "n_layers": 2, "n_heads": 4}, "image_size": 32, "msvq": "tiny",
             "scales": [1, 2, 4, 8], "tokenizer": {}, "batch": 4, "images": 64},
}
FUSED = ["train.compile=true", "model.config.loss_chunk=8192"]  # compiled blocks + fused linear cross-entropy
GRAPHS = "train.compile_mode=reduce-overhead"
B64 = "train.batch_size=64"
B96 = "train.batch_size=96"
B128 = "train.batch_size=128"
PLAIN_QK_ROPE = "model.config.trunk.fused_qk_rope=false"
BF16_RESIDUAL = "model.config.trunk.bf16_residual=true"
TUNED = "train.compile_tuning=true"  # the default since the fourth 2026-12-07 session; rows named so predate it
UNTUNED = "train.compile_tuning=false"
QUERY_GROUPS = ["model.config.trunk.attention=sdpa", "model.config.trunk.attention_group_rows=64"]
ROWS = {"plain": ["model.config.trunk.attention=sdpa", PLAIN_QK_ROPE],
        "compiled": ["train.compile=true"],
        "eager-fused-loss": ["model.config.loss_chunk=8192"],
        "compiled-ckpt": ["train.compile=true", "train.activation_checkpointing=true"],
        "fused": FUSED,
        "fused-sdpa": [*FUSED, "model.config.trunk.attention=sdpa"],
        "fused-plain-qk-rope": [*FUSED, PLAIN_QK_ROPE],
        "fused-b64": [*FUSED, B64],
        "fused-b64-graphs": [*FUSED, B64, GRAPHS],
        "fused-b96": [*FUSED, B96],
        "fused-b96-graphs": [*FUSED, B96, GRAPHS],
        "fused-b64-bf16-residual": [*FUSED, B64, BF16_RESIDUAL],
        "fused-b96-bf16-residual": [*FUSED, B96, BF16_RESIDUAL],
        "fused-b128-bf16-residual": [*FUSED, B128, BF16_RESIDUAL],
        "fused-b96-bf16-residual-graphs": [*FUSED, B96, BF16_RESIDUAL, GRAPHS],
        "fused-b96-bf16-residual-compiled-loss": [*FUSED, B96, BF16_RESIDUAL,
                                                  "model.config.loss_kernel=compiled"],
        "fused-b96-bf16-residual-triton-loss": [*FUSED, B96, BF16_RESIDUAL, "model.config.loss_kernel=triton"],
        "fused-b96-bf16-residual-plain-swiglu": [*FUSED, B96, BF16_RESIDUAL, "model.config.trunk.fused_swiglu=false"],
        "fused-b96-bf16-residual-tuned": [*FUSED, B96, BF16_RESIDUAL, TUNED],
        "fused-b96-bf16-residual-untuned": [*FUSED, B96, BF16_RESIDUAL, UNTUNED],
        "fused-b128-bf16-residual-tuned": [*FUSED, B128, BF16_RESIDUAL, TUNED],
        "fused-b128-bf16-residual-tuned-triton-loss": [*FUSED, B128, BF16_RESIDUAL, TUNED,
                                                       "model.config.loss_kernel=triton"],
        # the fastest on one H100 (2026-12-07, fifth session): + Inductor's programmatic dependent launch
        "fused-b128-bf16-residual-tuned-triton-loss-pdl": [*FUSED, B128, BF16_RESIDUAL, TUNED,
                                                           "model.config.loss_kernel=triton", "train.compile_pdl=true"],
        # the same with the gated residual + modulated norm compiled by Inductor (before the sixth session)
        "fused-b128-bf16-residual-tuned-triton-loss-pdl-plain-residual-norm": [
            *FUSED, B128, BF16_RESIDUAL, TUNED, "model.config.loss_kernel=triton", "train.compile_pdl=true",
            "model.config.trunk.fused_residual_norm=false"],
        "fused-b144-bf16-residual-tuned-triton-loss": [*FUSED, "train.batch_size=144", BF16_RESIDUAL, TUNED,
                                                       "model.config.loss_kernel=triton"],
        # DDP's knobs (no effect on a single process): bigger buckets, static graph, bf16 all-reduce
        "fused-b64-bucket100": [*FUSED, B64, "train.ddp_bucket_mb=100"],
        "fused-b64-static": [*FUSED, B64, "train.ddp_bucket_mb=100", "train.ddp_static_graph=true"],
        "fused-b64-bf16-reduce": [*FUSED, B64, "train.ddp_bucket_mb=100", "train.ddp_bf16_gradients=true"],
        "fused-b64-plain-qk-rope": [*FUSED, B64, PLAIN_QK_ROPE],
        "fused-graphs-plain-qk-rope": [*FUSED, GRAPHS, PLAIN_QK_ROPE],
        "fused-b64-groups": [*FUSED, B64, *QUERY_GROUPS],
        "fused-graphs-groups": [*FUSED, GRAPHS, *QUERY_GROUPS],
        "fused-liger": [*FUSED, "model.config.loss_kernel=liger"],
        "fused-graphs": [*FUSED, GRAPHS],
        "fused-autotune": [*FUSED, "train.compile_mode=max-autotune-no-cudagraphs"],
        "fused-autotune-graphs": [*FUSED, "train.compile_mode=max-autotune"]}
LAUNCH = {"single": None, "ddp": "multi_gpu_ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "zero2.yaml",
          "zero3": "zero3.yaml"}


def prepare(shape: dict[str, Any], folder: Path) -> Path:
    """Tokenizer and pre-tokenized shards in `folder`; returns the recipe file. The shards are made
    and encoded in child processes, so this one holds no GPU memory while the rows train."""
    import torch

    from tessera.registry import build_model
    from tessera.train.recipe import Recipe
    torch.manual_seed(0)
    build_model("multiscale_vq", shape["msvq"], image_size=shape["image_size"], scales=shape["scales"],
                **shape["tokenizer"]).save_pretrained(folder / "msvq")
    for args in (["data", "shapes", "--n", str(shape["images"]), "--res", "64", "--out", str(folder / "shapes")],
                 ["data", "tokenize", "--tokenizer", str(folder / "msvq"), "--in", str(folder / "shapes"),
                  "--out", str(folder / "tokens"), "--resolution", str(shape["image_size"])]):
        subprocess.run([sys.executable, "-m", "tessera.cli", *args], check=True, cwd=_ROOT, env=_child_env())
    recipe = Recipe.from_dict({
        "model": {"kind": "next_scale", "config": {"tokenizer": str(folder / "msvq"), "cond": "text",
                                                   "text_tokenizer": "auto", "trunk": shape["trunk"]}},
        "data": {"shards": str(folder / "tokens"), "num_workers": 2},
        "train": {"batch_size": shape["batch"], "sample_every": 0, "ckpt_every": 100000}})
    path = folder / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    return path


def _child_env() -> dict[str, str]:
    """This environment with the repository's `src` first on PYTHONPATH and Python's fault handler on."""
    return {**os.environ, "PYTHONFAULTHANDLER": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT / "src"), os.environ.get("PYTHONPATH")]))}


def run_row(recipe: Path, out: Path, overrides: list[str], launch: str | None, gpus: int, steps: int,
            timeout_s: float) -> dict[str, Any]:
    """Train `steps` steps; the last logged window's metrics (tokens/s, MFU, peak memory, ...). The
    trainer's output goes to `out/row.log`; a row still running after `timeout_s` gets SIGABRT, so
    Python's fault handler writes every thread's stack there, and its tail is returned as the error."""
    train = ["-m", "tessera.cli", "train", "--config", str(recipe), f"out={out}", f"train.steps={steps}",
             f"train.log_every={max(steps // 2, 1)}", *overrides]
    if launch is None:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(_ROOT / "launch" / "accelerate" / launch), "--num_processes", str(gpus), *train]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "row.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT, env=_child_env(),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)
            proc.wait()
            return {"error": f"timed out after {timeout_s:.0f} s", "log_tail": _tail(log_path)}
    if proc.returncode != 0:
        return {"error": f"rc {proc.returncode}", "log_tail": _tail(log_path)}
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])


def _tail(log: Path, chars: int = 4000) -> str:
    """The end of a row's log, without the fault handler's list of extension modules."""
    lines = [line for line in log.read_text().splitlines() if not line.startswith("Extension modules:")]
    return "\n".join(lines)[-chars:]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="d16")
    p.add_argument("--rows", default=",".join(ROWS), help=f"from {','.join(ROWS)}")
    p.add_argument("--launch", default="single", help=f"comma-separated, from {','.join(LAUNCH)}")
    p.add_argument("--runs", default=None, help="launch:row[:gpus] triples instead of --launch x --rows, "
                   "e.g. single:plain,single:compiled,zero2:plain:2")
    p.add_argument("--gpus", type=int, default=1, help="processes for the accelerate launches that name none")
    p.add_argument("--work", default=None, help="folder for the tokenizer, shards and rows, kept and reused "
                   "(default: a temporary folder)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--row-timeout", type=float, default=240.0, help="seconds before a row is stopped (stacks logged)")
    p.add_argument("--logs", default=None, help="folder to keep each row's trainer log in")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    runs = parse_runs(args)
    result: dict[str, Any] = {"benchmark": "train_throughput", "shape": args.shape,
                              "env": environment("cuda" if _cuda() else "cpu"), "rows": []}
    with (nullcontext(args.work) if args.work else tempfile.TemporaryDirectory()) as tmp:
        folder = Path(tmp)
        recipe = folder / "recipe.yaml"
        if not recipe.exists():
            recipe = prepare(shape, folder)
        for launch, row, gpus in runs:
            name = f"{launch}-{row}-{gpus}gpu"
            shutil.rmtree(folder / name, ignore_errors=True)
            metrics = run_row(recipe, folder / name, ROWS[row], LAUNCH[launch], gpus, args.steps, args.row_timeout)
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / name / "row.log", Path(args.logs) / f"{name}.log")
            result["rows"].append({"row": row, "launch": launch, "gpus": gpus, **metrics})
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                     if k in ("tokens_per_s", "tflops_per_s", "mfu", "peak_mem_gb", "loss", "error")}
            if "log_tail" in metrics:
                print(metrics["log_tail"][-1500:], flush=True)
            print(f"{launch} {row} x{gpus}: {shown}", flush=True)
            write_json(args.json, result)
    return result


def parse_runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(launch, row, gpus) for each run asked for; a clear error for an unknown launch or row."""
    if args.runs:
        runs = []
        for triple in args.runs.split(","):
            parts = triple.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
                raise SystemExit(f"--runs: {triple!r} is not launch:row or launch:row:gpus")
            runs.append((parts[0], parts[1], int(parts[2]) if len(parts) == 3 else _default_gpus(parts[0], args)))
    else:
        runs = [(launch, row, _default_gpus(launch, args)) for launch in args.launch.split(",")
                for row in args.rows.split(",")]
    for launch, row, gpus in runs:
        if launch not in LAUNCH or row not in ROWS:
            raise SystemExit(f"--runs: unknown {'launch' if launch not in LAUNCH else 'row'} in {launch}:{row}; "
                             f"launches: {', '.join(LAUNCH)}; rows: {', '.join(ROWS)}")
        if launch == "single" and gpus != 1:
            raise SystemExit(f"--runs: {launch}:{row}:{gpus}: a single-process run uses one GPU")
    return runs


def _default_gpus(launch: str, args: argparse.Namespace) -> int:
    return 1 if launch == "single" else args.gpus


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
