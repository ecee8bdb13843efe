"""`tessera eval ...`: evaluation commands that write a JSON report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import atomic_write_text


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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint (tokenizer or codec reconstruction)")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("tokenizer", help="reconstruction PSNR (and codebook usage) of an image tokenizer (vq, multiscale_vq, kl) on shards")
    p.add_argument("--ckpt", required=True, help="tokenizer checkpoint or run folder")
    p.add_argument("--shards", required=True, help="held-out image shards")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", default="tokenizer_eval.json", help="JSON report; the grid goes next to it as .png")
    p.set_defaults(func=_tokenizer)
    p = sub.add_parser("codec", help="reconstruction SI-SNR, mel distance and codebook usage of an audio codec on "
                       "audio shards, for 1..K codebooks")
    p.add_argument("--ckpt", required=True, help="audio codec checkpoint or run folder")
    p.add_argument("--shards", required=True, help="held-out audio shards (tessera data audio)")
    p.add_argument("--n", type=int, default=256, help="number of clips")
    p.add_argument("--clip-seconds", type=float, default=2.0, help="clips are cropped or zero-padded to this length")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", default="codec_eval.json", help="JSON report")
    p.set_defaults(func=_codec)
