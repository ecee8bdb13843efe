"""Next-scale (VAR) vs raster next-token sampling on the same trunk and the same final token grid.

Class-conditional, random weights, decoder included on both sides (images out). Shape `d16`:
VAR-d16's trunk (16 layers, width 1024, 16 heads), vocab 4096, final grid 16x16 at 256px
(scales 1,2,3,4,5,6,8,10,13,16 = 680 tokens for next-scale, 256 for next-token); CFG as a
doubled batch (linear ramp for next-scale as VAR, constant for next-token), top-k 900, top-p
0.96. Rows: next-token compiled (CUDA-graph'd decode step), next-scale eager (KV cache, scale
by scale), next-scale with each scale's step replayed as one CUDA graph (`cudagraph`: eager kernels
captured in about a second; `compiled`: torch.compile's fused kernels, minutes to compile) and
FoundationVision/VAR's own `autoregressive_infer_cfg` at the same shape (its files carried in
`.peers/VAR`, see bench/peers/var.py; `--no-var` skips it), each at `--batch` (throughput) and at
batch 1 (latency). Then training throughput (tokens/s) of both generators at the same size:
fp32 weights, bf16 autocast, fused AdamW, batch `--train-batch`, from token ids (the tokenizer
encode is left out on both sides). `tiny` is the CPU smoke shape.

GPU (from the repo root; about 5-8 minutes):

    source .whl/setup.sh; python3 bench/next_scale_sampling.py --shape d16 --json $OUT/next_scale_bench.json

CPU smoke:  .venv/bin/python bench/next_scale_sampling.py --device cpu --shape tiny --reps 1

The VAR paper reports next-scale about 20x faster than its AR baseline. Reference, measured
once on an H100: VAR-d16 124 img/s at batch 64, about 129 ms per image at batch 1. Goals: next-scale
>= 1.5x VAR at batch 64, <= 40 ms at batch 1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from timing import environment, measure, write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROWS = ("next_token-compiled", "next_scale-eager", "next_scale-cudagraph", "next_scale-compiled", "var-eager")


@dataclass
class Shape:
    trunk: dict[str, int]
    image_size: int
    scales: list[int]
    vocab: int
    tokenizer_preset: str
    multiscale_preset: str
    tokenizer_overrides: dict[str, Any]
    batch: int
    var_depth: int
    var_ch: int


SHAPES = {
    "d16": Shape({"dim": 1024, "n_layers": 16, "n_heads": 16}, 256, [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 4096,
                 "vq16", "var16", {"codebook_size": 4096, "code_dim": 32}, 64, 16, 160),
    # VAR's VQVAE always downsamples 16x, so its tiny twin makes 64px images from the 4x4 grid.
    "tiny": Shape({"dim": 64, "n_layers": 2, "n_heads": 4}, 32, [1, 2, 4, 8], 256, "tiny", "tiny", {}, 2, 1, 32),
}


def build_models(shape: Shape, folder: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Random-weight tokenizers (saved to `folder`) and the two generators on the same trunk."""
    from tessera.registry import build_model
    torch.manual_seed(0)
    build_model("vq", shape.tokenizer_preset, image_size=shape.image_size,
                **shape.tokenizer_overrides).save_pretrained(folder / "vq")
    build_model("multiscale_vq", shape.multiscale_preset, image_size=shape.image_size, scales=shape.scales,
                **shape.tokenizer_overrides).save_pretrained(folder / "msvq")
    common = {"trunk": shape.trunk, "cond": "class", "num_classes": 1000}
    token = build_model("next_token", None, tokenizer=str(folder / "vq"), image_size=shape.image_size, **common)
    scale = build_model("next_scale", None, tokenizer=str(folder / "msvq"), **common)
    return {name: m.to(device, dtype).eval() for name, m in (("next_token", token), ("next_scale", scale))}


def training_rows(shape: Shape, batch: int, device: torch.device, warmup: int, reps: int) -> list[dict[str, Any]]:
    """Tokens/s of one optimizer step (forward, backward, fused AdamW) of each generator."""
    rows = []
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(shape, Path(tmp), str(device), torch.float32)
    side = shape.scales[-1]
    for name, model in models.items():
        model.train()
        tokens = (torch.randint(0, shape.vocab, (batch, side, side), device=device) if name == "next_token"
                  else torch.randint(0, shape.vocab, (batch, model.tokens_per_sample), device=device))
        data = {"tokens": tokens, "class": torch.arange(batch, device=device) % 1000}
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = model(data)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        stats = measure(step, device, warmup, reps)
        assert torch.isfinite(stats.pop("output"))
        rows.append({"row": f"{name}-train", "batch": batch, "tokens": model.tokens_per_sample,
                     "tokens_per_s": batch * model.tokens_per_sample / stats["median_s"],
                     "samples_per_s": batch / stats["median_s"], **stats})
        print(f"{name} training batch {batch}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
              f"{rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tessera.samplers.autoregressive import AutoregressiveSampler, ScaleWiseSampler
    from tessera.samplers.logits import SamplingConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="d16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--cfg", type=float, default=2.5, help="standard w (at the last scale for next-scale)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--no-var", action="store_true", help="skip the FoundationVision/VAR row")
    p.add_argument("--var-dir", default=str(_BENCH.parent / ".peers" / "VAR"))
    p.add_argument("--train-batch", type=int, default=None, help="training rows' batch (default: 32; tiny: 2)")
    p.add_argument("--no-train", action="store_true", help="skip the training rows")
    p.add_argument("--rows", default=",".join(r for r in ROWS if r != "next_scale-compiled"),
                   help=f"sampling rows to run, from {','.join(ROWS)} (default: all but next_scale-compiled, "
                        "whose compilation takes about 5 minutes per batch size on an H100)")
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default: --batch and 1)")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    cuda = torch.device(args.device).type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    batch = args.batch or shape.batch
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [batch, 1]
    wanted = set(args.rows.split(","))
    if wanted - set(ROWS):
        p.error(f"unknown rows {sorted(wanted - set(ROWS))}; choose from {','.join(ROWS)}")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(shape, Path(tmp), args.device, dtype)
    filters = {"top_k": min(900, shape.vocab), "top_p": 0.96, "seed": 0}
    scale_settings = SamplingConfig(cfg=args.cfg, cfg_schedule="linear", **filters)
    samplers = {
        "next_token-compiled": (models["next_token"], AutoregressiveSampler(
            SamplingConfig(cfg=args.cfg, **filters), compile=cuda)),
        "next_scale-eager": (models["next_scale"], ScaleWiseSampler(scale_settings)),
        "next_scale-cudagraph": (models["next_scale"], ScaleWiseSampler(scale_settings, cuda_graph=cuda)),
        "next_scale-compiled": (models["next_scale"], ScaleWiseSampler(scale_settings, compile=cuda)),
    }
    calls = {name: (lambda labels, m=model, s=sampler: m.sample(labels, s), model)
             for name, (model, sampler) in samplers.items() if name in wanted}
    if "var-eager" in wanted and not args.no_var:
        from peers.var import VARSampler
        var = VARSampler(depth=shape.var_depth, patch_nums=tuple(shape.scales), vocab_size=shape.vocab,
                         num_classes=1000, ch=shape.var_ch, device=args.device, dtype=dtype, cfg=args.cfg - 1.0,
                         top_k=filters["top_k"], top_p=filters["top_p"], var_dir=args.var_dir)
        calls["var-eager"] = (var, var.var)
    rows = []
    for name, (call, model) in calls.items():
        for b in batches:
            labels = torch.arange(b, device=device) % 1000
            with torch.no_grad():
                stats = measure(lambda: call(labels), device, args.warmup, args.reps)
            images = stats.pop("output")
            assert images.shape[0] == b and torch.isfinite(images.float()).all()
            rows.append({"row": name, "batch": b, "img_per_s": b / stats["median_s"],
                         "ms_per_image": 1e3 * stats["median_s"] / b,
                         "tokens": getattr(model, "tokens_per_sample", getattr(model, "L", None)),
                         "compiled": name.endswith("compiled") and cuda,
                         "params": sum(p.numel() for p in model.parameters() if p.requires_grad), **stats})
            print(f"{name} batch {b}: {rows[-1]['img_per_s']:.1f} img/s, {rows[-1]['ms_per_image']:.1f} ms/img "
                  f"(first call {stats['first_call_s']:.1f} s)", flush=True)
    result = {"benchmark": "next_scale_sampling", "shape": args.shape, "dtype": str(dtype), "cfg": args.cfg,
              "env": environment(args.device), "rows": rows}
    if cuda and {"next_scale-eager", "next_scale-cudagraph"} <= wanted:
        labels = torch.arange(batches[-1], device=device) % 1000
        with torch.no_grad():
            same = torch.equal(samplers["next_scale-eager"][1](models["next_scale"], labels),
                               samplers["next_scale-cudagraph"][1](models["next_scale"], labels))
        result["cudagraph_tokens_equal_eager"] = same
        print(f"next_scale-cudagraph draws the same tokens as eager at batch {batches[-1]}: {same}")
    del models, samplers, calls
    by = {(r["row"], r["batch"]): r for r in rows}
    for b in batches:
        scale_rows = [r for r in rows if r["row"].startswith("next_scale") and r["batch"] == b]
        if not scale_rows:
            continue
        best = max(scale_rows, key=lambda r: r["img_per_s"])
        for other in ("next_token-compiled", "var-eager"):
            if (other, b) in by:
                ratio = best["img_per_s"] / by[(other, b)]["img_per_s"]
                result[f"{best['row']}_over_{other}_batch{b}"] = ratio
                print(f"{best['row']} / {other} at batch {b}: {ratio:.2f}x")
    if not args.no_train:
        train_batch = args.train_batch or (32 if args.shape == "d16" else 2)
        write_json(args.json, result)
        result["training"] = training_rows(shape, train_batch, device, args.warmup, args.reps)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
