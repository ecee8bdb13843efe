"""`tessera eval ...`: evaluation commands that write a JSON report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..config import ConfigError


def _tokenizer(args: argparse.Namespace) -> None:
    from .reconstruction import evaluate_tokenizer
    out = Path(args.out)
    report = evaluate_tokenizer(args.ckpt, args.shards, n=args.n, batch_size=args.batch_size,
                                grid_path=out.with_suffix(".png"), device=args.device, progress=True)
    report.update(ckpt=str(args.ckpt), shards=str(args.shards))
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    codes = (f", codebook usage {report['codebook_usage']:.1%} ({report['codes_used']}/{report['codebook_size']}), "
             f"perplexity {report['code_perplexity']:.0f}") if "codes_used" in report else ""
    print(f"PSNR {report['psnr_db']:.2f} dB{codes}; wrote {out}")


def _codec(args: argparse.Namespace) -> None:
    import torch

    from ..data.audio_loader import make_audio_loader
    from ..checkpoint import CheckpointError
    from ..modeling import TesseraModel
    from .audio_metrics import codec_report
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    codec = TesseraModel.from_pretrained(args.ckpt).to(device).eval()
    if codec.kind != "audio_codec":
        raise CheckpointError(f"{args.ckpt} holds a '{codec.kind}' model, not an audio codec")
    k = codec.config.num_codebooks
    report = {"ckpt": str(args.ckpt), "shards": str(args.shards), "clip_seconds": args.clip_seconds,
              "sample_rate": codec.config.sample_rate, "by_codebooks": {}}
    for streams in range(1, k + 1):  # quality as streams are added (the bitrate ladder)
        loader = make_audio_loader(str(args.shards), args.batch_size, codec.config.sample_rate, args.clip_seconds,
                                   seed=12345, shuffle_buffer=0, infinite=False)
        batches = args.n // args.batch_size + (args.n % args.batch_size > 0)
        report["by_codebooks"][streams] = codec_report(codec, loader, max_batches=batches, num_codebooks=streams,
                                                       device=device)
    report.update(report["by_codebooks"][k])
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    ladder = ", ".join(f"{s}: {r['si_snr_db']:.2f} dB" for s, r in report["by_codebooks"].items())
    print(f"SI-SNR {report['si_snr_db']:.2f} dB, mel distance {report['mel_distance']:.3f} at "
          f"{report['bitrate_kbps']:g} kbps over {report['items']} clips (by codebooks {ladder}); wrote {out}")


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _fid(args: argparse.Namespace) -> None:
    from ..images import save_grid
    from .charts import bar_chart, line_chart
    from .generative import evaluate_generator
    cfgs = _parse_floats(args.cfg, "--cfg")
    given = {"top_k": args.top_k} if args.top_k is not None else {}
    from .generative import default_cache_dir
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    report, samples = evaluate_generator(args.ckpt, args.ref, args.n, cfgs, args.backbone, args.inception_weights,
                                         args.device, args.batch_size, args.seed, given, cache)
    out = Path(args.out)
    metric = report["metric"]
    rows = report["rows"]
    if len(rows) > 1:
        line_chart([r["cfg"] for r in rows], [r[metric] for r in rows], out.with_suffix(".png"),
                   f"{metric} vs CFG ({report['n']} samples)", "cfg")
    else:
        bar_chart([metric, "precision", "recall"], [rows[0][metric], rows[0]["precision"], rows[0]["recall"]],
                  out.with_suffix(".png"), f"{metric} at cfg {rows[0]['cfg']:g} ({report['n']} samples)")
    save_grid(samples[:64].float() / 127.5 - 1, out.with_name(out.stem + "_samples.png"))
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    for r in rows:
        print(f"cfg {r['cfg']:g}: {metric} {r[metric]:.3f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}")
    print(f"wrote {out}")


def _compositional(args: argparse.Namespace) -> None:
    from .charts import bar_chart, marked_grid
    from .compositional_eval import evaluate_compositional
    given = {"top_k": args.top_k} if args.top_k is not None else {}
    report, images, passed = evaluate_compositional(args.ckpt, args.per_prompt, args.limit, args.cfg, args.device,
                                                    args.batch_size, args.seed, given)
    out = Path(args.out)
    tasks = report["tasks"]
    bar_chart([*tasks, "overall"], [*tasks.values(), report["overall"]], out.with_suffix(".png"),
              f"compositional accuracy, cfg {args.cfg:g}, {report['prompts']} prompts x {args.per_prompt}", top=1.0)
    marked_grid(images[:128], passed[:128], out.with_name(out.stem + "_samples.png"), nrow=args.per_prompt * 4)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print("; ".join(f"{tag} {acc:.3f}" for tag, acc in tasks.items()) + f"; overall {report['overall']:.3f}")
    print(f"wrote {out}")


def _train_classifier(args: argparse.Namespace) -> None:
    import torch

    from ..data.loader import make_image_loader
    from ..data.shapes import SHAPES
    from .feature_classifier import train_feature_classifier
    from .generative import to_uint8
    images, labels, categories = [], [], []
    for batch in make_image_loader(args.shards, 256, args.resolution, seed=0, infinite=False, shuffle_buffer=0):
        images.append(to_uint8(batch["image"]))
        if args.label == "class":
            labels += batch["class"].tolist()
        elif args.label == "shape":  # shapes scenes: the class of the first object
            labels += [SHAPES.index(meta["objects"][0]["class"]) for meta in batch["meta"]]
        else:  # emoji: the metadata's category, numbered in sorted order below
            categories += [meta.get("category") or "" for meta in batch["meta"]]
        if max(len(labels), len(categories)) >= args.n:
            break
    if categories and all(categories):
        names = sorted(set(categories))
        labels = [names.index(c) for c in categories]
    if not labels or min(labels) < 0:
        raise ConfigError(f"{args.shards} has no '{args.label}' labels to train on (class -1 means none)")
    model = train_feature_classifier(torch.cat(images)[:args.n], labels[:args.n], name=args.name,
                                     image_size=args.resolution, epochs=args.epochs, device=args.device or "cpu",
                                     out=args.out)
    print(f"{model.tag}: train accuracy {model.train_accuracy:.3f} on {min(len(labels), args.n)} images; "
          f"wrote {args.out} (use --backbone classifier:{args.out})")


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str, ckpt_help: str, batch_size: int,
                out: str, out_help: str, func) -> argparse.ArgumentParser:
    """A subcommand with the arguments every evaluation takes: --ckpt, --batch-size, --device, --out."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", default=out, help=out_help)
    p.set_defaults(func=func)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint (reconstruction, FID/FD, compositional)")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = _subcommand(sub, "tokenizer", "reconstruction PSNR (and codebook usage) of an image tokenizer (vq, "
                    "multiscale_vq, kl) on shards", "tokenizer checkpoint or run folder", 100,
                    "tokenizer_eval.json", "JSON report; the grid goes next to it as .png", _tokenizer)
    p.add_argument("--shards", required=True, help="held-out image shards")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p = _subcommand(sub, "codec", "reconstruction SI-SNR, mel distance and codebook usage of an audio codec on "
                    "audio shards, for 1..K codebooks", "audio codec checkpoint or run folder", 32,
                    "codec_eval.json", "JSON report", _codec)
    p.add_argument("--shards", required=True, help="held-out audio shards (tessera data audio)")
    p.add_argument("--n", type=int, default=256, help="number of clips")
    p.add_argument("--clip-seconds", type=float, default=2.0, help="clips are cropped or zero-padded to this length")
    p = _subcommand(sub, "fid", "FID (with the Inception weights file) or FD-EffNetLite0 / classifier FD, "
                    "precision/recall (and IS with Inception) of a generator against reference image shards",
                    "generator checkpoint or run folder", 64, "fid_eval.json",
                    "JSON report; chart (.png) and samples grid go next to it", _fid)
    p.add_argument("--ref", required=True, help="reference image shards (their captions/classes prompt the model)")
    p.add_argument("--n", type=int, default=10000, help="samples per side (FID is unreliable below ~2048)")
    p.add_argument("--cfg", default="3", help="CFG weight, or a comma-separated sweep, e.g. 1,2,3,4")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--backbone", default="auto", help="auto, inception, effnet or classifier:DIR")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception weights file (else $TESSERA_INCEPTION_WEIGHTS); never downloaded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="reference feature cache (default: $TESSERA_CACHE/eval or "
                   "~/.cache/tessera/eval)")
    p.add_argument("--no-cache", action="store_true", help="recompute the reference features")
    p = _subcommand(sub, "compositional", "GenEval-style benchmark on the shapes world, scored exactly: per-task "
                    "accuracy of a text-conditional image generator", "generator checkpoint or run folder", 64,
                    "compositional_eval.json", "JSON report; per-task chart (.png) and a pass/fail grid go next to it",
                    _compositional)
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each task (quick runs)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train-classifier", help="train the small feature classifier whose features give a "
                       "dataset-specific FD (for data far from ImageNet: Fashion-MNIST, shapes)")
    p.add_argument("--shards", required=True, help="labelled image shards")
    p.add_argument("--label", choices=("class", "shape", "category"), default="class",
                   help="class: the shards' class labels; shape: the first object's shape (shapes scenes); "
                        "category: the metadata's category (emoji)")
    p.add_argument("--name", required=True, help="the metric's name in reports, e.g. FD-fashion-classifier")
    p.add_argument("--n", type=int, default=20000, help="training images")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cpu)")
    p.add_argument("--out", required=True, help="classifier folder (config.json + model.safetensors)")
    p.set_defaults(func=_train_classifier)
