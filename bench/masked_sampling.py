"""Masked vs autoregressive sampling on the same trunk: MAGNeT vs the delay-pattern AR baseline on
audio codec tokens, and MaskGIT vs raster next-token on an image token grid.

Random weights, text/class conditions, CFG as a doubled batch, bf16, decoders included (waveforms
and images out). Audio: the `small` codec (16 kHz, 50 Hz frames, 4 x 1024 codes), `--seconds` of
audio; MAGNeT decodes 20/10/10/10 steps with spans of 3 (eager: it re-reads the whole sequence
every step; `-compiled`: its forward pass compiled with CUDA-graph replay), the AR baseline runs
its CUDA-graph'd decode step over T + 3 delay-pattern steps. Images: the 256px VQ grid 16x16,
MaskGIT 12 steps (eager and compiled) vs next-token compiled (256 steps). Batch 1 (latency) and
a throughput batch. Reported: seconds of audio per wall second, images per second.

GPU:  source .whl/setup.sh; python3 bench/masked_sampling.py --json $OUT/masked_bench.json
CPU smoke:  .venv/bin/python bench/masked_sampling.py --device cpu --shape tiny --reps 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from timing import environment, measure, write_json  # noqa: E402

SHAPES = {
    # VAR-d16-sized trunk for every row; the MusicGen-small trunk is 1024 wide, 24 deep.
    "d16": {"trunk": {"dim": 1024, "n_layers": 16, "n_heads": 16}, "codec": "small", "seconds": 10.0,
            "vq": "vq16", "image_size": 256, "audio_batches": (1, 8), "image_batches": (64,)},
    "tiny": {"trunk": {"dim": 64, "n_layers": 2, "n_heads": 4}, "codec": "tiny", "seconds": 0.05,
             "vq": "tiny", "image_size": 32, "audio_batches": (1, 2), "image_batches": (2,)},
}


def build(shape: dict[str, Any], folder: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from tessera.registry import build_model
    torch.manual_seed(0)
    build_model("audio_codec", shape["codec"]).save_pretrained(folder / "codec")
    build_model("vq", shape["vq"], image_size=shape["image_size"]).save_pretrained(folder / "vq")
    audio = {"tokenizer": str(folder / "codec"), "cond": "class", "num_classes": 10,
             "trunk": {**shape["trunk"], "rope_axes": 1}, "clip_seconds": shape["seconds"]}
    image = {"tokenizer": str(folder / "vq"), "cond": "class", "num_classes": 1000, "trunk": shape["trunk"],
             "image_size": shape["image_size"]}
    models = {"magnet": build_model("magnet", None, **audio),
              "ar_delay": build_model("next_token_streams", None, pattern="delay", **audio),
              "maskgit": build_model("maskgit", None, **image),
              "next_token": build_model("next_token", None, **image)}
    return {name: m.to(device, dtype).eval() for name, m in models.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tessera.samplers.autoregressive import AutoregressiveSampler
    from tessera.samplers.logits import SamplingConfig
    from tessera.samplers.masked import MaskedSampler, MaskedSamplingConfig, StreamMaskedSampler

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="d16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        models = build(shape, Path(tmp), args.device, dtype)
    magnet_settings = SamplingConfig(cfg=3.0, cfg_schedule="decreasing", temperature=3.0, top_p=0.9)
    rows: dict[str, tuple] = {
        "magnet-eager": ("magnet", StreamMaskedSampler(magnet_settings)),
        "magnet-compiled": ("magnet", StreamMaskedSampler(magnet_settings, compile=cuda)),
        "ar_delay-compiled": ("ar_delay", AutoregressiveSampler(SamplingConfig(cfg=3.0, top_k=250), compile=cuda,
                                                                 kv_bucket=0)),
        "maskgit-eager": ("maskgit", MaskedSampler(SamplingConfig(cfg=3.0), MaskedSamplingConfig(steps=12))),
        "maskgit-compiled": ("maskgit", MaskedSampler(SamplingConfig(cfg=3.0), MaskedSamplingConfig(steps=12),
                                                      compile=cuda)),
        "next_token-compiled": ("next_token", AutoregressiveSampler(SamplingConfig(cfg=3.0), compile=cuda,
                                                                    kv_bucket=0)),
    }
    result: dict[str, Any] = {"benchmark": "masked_sampling", "shape": args.shape, "dtype": str(dtype),
                              "env": environment(args.device), "rows": []}
    for name, (model_name, sampler) in rows.items():
        model = models[model_name]
        audio = model.modality == "audio"
        for b in shape["audio_batches"] if audio else shape["image_batches"]:
            labels = torch.arange(b, device=device) % model.prefix.num_classes
            with torch.no_grad():
                stats = measure(lambda: model.sample(labels, sampler), device, args.warmup, args.reps)
            out = stats.pop("output")
            assert out.shape[0] == b and torch.isfinite(out.float()).all()
            row = {"row": name, "batch": b, **stats,
                   "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            if audio:
                row["audio_s_per_s"] = b * shape["seconds"] / stats["median_s"]
                print(f"{name} batch {b}: {row['audio_s_per_s']:.1f} s of audio per s "
                      f"({stats['median_s']:.2f} s per call, first {stats['first_call_s']:.1f} s)", flush=True)
            else:
                row["img_per_s"] = b / stats["median_s"]
                print(f"{name} batch {b}: {row['img_per_s']:.1f} img/s (first {stats['first_call_s']:.1f} s)", flush=True)
            result["rows"].append(row)
            write_json(args.json, result)
    by = {(r["row"], r["batch"]): r for r in result["rows"]}
    for masked, ar, key, batches in (("magnet", "ar_delay", "audio_s_per_s", shape["audio_batches"]),
                                     ("maskgit", "next_token", "img_per_s", shape["image_batches"])):
        for mode in ("eager", "compiled"):
            for b in batches:
                ratio = by[(f"{masked}-{mode}", b)][key] / by[(f"{ar}-compiled", b)][key]
                result[f"{masked}_{mode}_over_{ar}_batch{b}"] = ratio
                print(f"{masked} ({mode}) / {ar} (compiled) at batch {b}: {ratio:.2f}x")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
