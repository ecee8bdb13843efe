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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint (tokenizer reconstruction)")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("tokenizer", help="reconstruction PSNR (and codebook usage) of an image tokenizer (vq, multiscale_vq, kl) on shards")
    p.add_argument("--ckpt", required=True, help="tokenizer checkpoint or run folder")
    p.add_argument("--shards", required=True, help="held-out image shards")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", default="tokenizer_eval.json", help="JSON report; the grid goes next to it as .png")
    p.set_defaults(func=_tokenizer)
