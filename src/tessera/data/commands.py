"""`tessera data ...`: write shapes, Fashion-MNIST, emoji or captioned audio as WebDataset shards, or
encode image shards into token shards."""
from __future__ import annotations

import argparse
from typing import Any

from ..config import ConfigError
from .audio_sources import AUDIO_SOURCES, DEFAULT_INSTRUMENTS, write_audio_dataset
from .shapes import MAX_RESOLUTION, MIN_RESOLUTION, write_shapes_dataset
from .sources import (DEFAULT_NPM_CACHE, EMOJI_STYLES, FASHION_MNIST_DIR, FASHION_MNIST_SPLITS, write_emoji,
                      write_fashion_mnist)


def _check_res(res: int) -> None:
    if not MIN_RESOLUTION <= res <= MAX_RESOLUTION:
        raise ConfigError(f"--res must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {res}")


def _at_least(flag: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{flag} must be at least {low}, got {value}")


def _report(info: dict[str, Any], out: str) -> None:
    print(f"wrote {info['count']} samples in {len(info['shards'])} shard(s) to {out}")


def _shapes(args: argparse.Namespace) -> None:
    _check_res(args.res)
    _at_least("--n", args.n, 1)
    _at_least("--seed", args.seed, 0)
    _at_least("--per-shard", args.per_shard, 1)
    _report(write_shapes_dataset(args.out, args.n, args.res, seed=args.seed, per_shard=args.per_shard,
                                 progress=True), args.out)


def _fashion_mnist(args: argparse.Namespace) -> None:
    _at_least("--per-shard", args.per_shard, 1)
    _report(write_fashion_mnist(args.out, args.split, root=args.root, install=args.install,
                                per_shard=args.per_shard, progress=True), args.out)


def _emoji(args: argparse.Namespace) -> None:
    _check_res(args.res)
    _at_least("--per-shard", args.per_shard, 1)
    _report(write_emoji(args.out, args.res, args.style, cache=args.cache, install=args.install,
                        per_shard=args.per_shard, progress=True), args.out)


def _audio(args: argparse.Namespace) -> None:
    _at_least("--per-shard", args.per_shard, 1)
    _at_least("--instruments", args.instruments, 1)
    _at_least("--seed", args.seed, 0)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    info = write_audio_dataset(args.out, args.rate, sources, install=args.install, per_shard=args.per_shard,
                               max_seconds=args.max_seconds, instruments_n=args.instruments, seed=args.seed)
    for name, got in info["sources"].items():
        skipped = ", ".join(f"{n} {why}" for why, n in got["skipped"].items()) or "none"
        print(f"{name:>12}: found {got['found']}, wrote {got['written']} ({got['seconds'] / 60:.1f} min), "
              f"skipped {sum(got['skipped'].values())} ({skipped})")
    print(f"wrote {info['count']} clips ({info['seconds'] / 60:.1f} min at {args.rate} Hz) "
          f"in {len(info['shards'])} shard(s) to {args.out}")


def _tokenize(args: argparse.Namespace) -> None:
    from .tokenize import tokenize_shards
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--per-shard", args.per_shard, 1)
    if args.resolution is not None:
        _at_least("--resolution", args.resolution, 1)
    info = tokenize_shards(args.src, args.out, args.tokenizer, batch_size=args.batch_size, device=args.device,
                           resolution=args.resolution, per_shard=args.per_shard, progress=True)
    print(f"{info['tokenizer_kind']} tokens {'x'.join(map(str, info['grid']))} ({info['dtype']}) of "
          f"{info['count']} images in {len(info['shards'])} shard(s) to {args.out}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its subcommands (each sets `func` to its handler)."""
    data = subparsers.add_parser("data", help="write a dataset as WebDataset shards "
                                              "(shapes, fashion-mnist, emoji, audio), "
                                              "or encode image shards into token shards (tokenize)")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("shapes", help="procedural captioned shape scenes with GenEval-style ground truth")
    p.add_argument("--n", type=int, default=50000, help="number of scenes")
    p.add_argument("--res", type=int, default=64, help=f"resolution, {MIN_RESOLUTION}-{MAX_RESOLUTION}")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier dataset)")
    p.add_argument("--seed", type=int, default=0, help="scene set; scene i of a seed is the same at every --res")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard")
    p.set_defaults(func=_shapes)

    p = sub.add_parser("fashion-mnist", help="Fashion-MNIST from the Debian package dataset-fashion-mnist")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier dataset)")
    p.add_argument("--split", default="train", choices=sorted(FASHION_MNIST_SPLITS))
    p.add_argument("--install", action="store_true", help="apt-get install the package if it is missing")
    p.add_argument("--root", default=str(FASHION_MNIST_DIR), help="folder with the *-ubyte.gz files")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard")
    p.set_defaults(func=_fashion_mnist)

    p = sub.add_parser("emoji", help="Noto and Fluent 3D emoji (npm packages) captioned with their names")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier dataset)")
    p.add_argument("--res", type=int, default=64, help=f"resolution, {MIN_RESOLUTION}-{MAX_RESOLUTION}")
    p.add_argument("--style", default="both", choices=sorted(EMOJI_STYLES))
    p.add_argument("--install", action="store_true", help="`npm pack` the packages into --cache if missing")
    p.add_argument("--cache", default=str(DEFAULT_NPM_CACHE), help="folder holding the npm tarballs")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard")
    p.set_defaults(func=_emoji)

    p = sub.add_parser("audio", help="captioned audio from Debian packages: Asterisk English speech, Tux Paint "
                                     "spoken descriptions, FluidSynth instrument notes and melodies")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier dataset)")
    p.add_argument("--rate", type=int, default=16000, help="sample rate in Hz, e.g. 16000 or 24000")
    p.add_argument("--sources", default=",".join(AUDIO_SOURCES), help="comma-separated: " + ",".join(AUDIO_SOURCES))
    p.add_argument("--install", action="store_true", help="apt-get install the missing sources' packages")
    p.add_argument("--instruments", type=int, default=DEFAULT_INSTRUMENTS, help="instrument clips to render")
    p.add_argument("--max-seconds", type=float, default=10.0, help="longer clips are cut to this length")
    p.add_argument("--per-shard", type=int, default=2000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="sample order and the instrument clips")
    p.set_defaults(func=_audio)

    p = sub.add_parser("tokenize", help="encode image shards once with a VQ or multi-scale VQ tokenizer into "
                                        "shards of token arrays (generator training then skips the tokenizer)")
    p.add_argument("--tokenizer", required=True, help="image tokenizer checkpoint folder (vq, multiscale_vq)")
    p.add_argument("--in", dest="src", metavar="SHARDS", required=True, help="folder of image shards")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--batch-size", type=int, default=256, help="images encoded at once")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--resolution", type=int, default=None, help="image side fed to the tokenizer "
                                                                "(default: the tokenizer's image size)")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard")
    p.set_defaults(func=_tokenize)
