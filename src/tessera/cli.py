"""`tessera` entry point: data, train, sample, eval, quickstart."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from .checkpoint import CheckpointError
from .config import Config, ConfigError


def add_config_flags(parser: argparse.ArgumentParser, config_class: type[Config], prefix: str = "") -> None:
    """One `--{prefix}field-name` flag per field of a flat config dataclass (its defaults shown in help)."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"cfg_{prefix.replace('-', '_')}{f.name}", default=None,
                            metavar=f.name.upper(),
                            help=f"{hints[f.name].__name__ if hasattr(hints[f.name], '__name__') else hints[f.name]} "
                                 f"(default {default})")


def flags_given(args: argparse.Namespace, config_class: type[Config], prefix: str = "") -> dict:
    """{field: value} for the config flags that were given (strings, parsed by the config later)."""
    dest = f"cfg_{prefix.replace('-', '_')}"
    return {f.name: getattr(args, dest + f.name) for f in dataclasses.fields(config_class)
            if getattr(args, dest + f.name) is not None}


def config_from_flags(args: argparse.Namespace, config_class: type[Config], prefix: str = "") -> Config:
    """Build the config from the flags that were given (strings are parsed by the config)."""
    return config_class.from_dict(flags_given(args, config_class, prefix))


def _train(args: argparse.Namespace) -> None:
    from .train.recipe import Recipe
    from .train.trainer import train
    recipe = Recipe.from_file(args.config).with_overrides(args.overrides)
    if args.print_config:
        print(recipe.to_yaml())
        return
    metrics = train(recipe, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # once per launch, not once per process
        print(f"done: step {metrics['step']}, loss {metrics.get('loss', float('nan')):.4f}; run folder {recipe.out}")


def _sample(args: argparse.Namespace) -> None:
    from .sample import generate_to_file
    from .samplers.flow import FlowSamplingConfig
    from .samplers.logits import SamplingConfig
    from .samplers.masked import MaskedSamplingConfig
    given = flags_given(args, SamplingConfig)
    SamplingConfig.from_dict(given)  # bad values fail before the checkpoint loads
    flow = config_from_flags(args, FlowSamplingConfig, "flow-")
    masked = flags_given(args, MaskedSamplingConfig, "masked-")
    if args.steps is not None:
        try:
            counts = [int(v) for v in args.steps.split(",")]
        except ValueError:
            raise ConfigError(f"--steps={args.steps!r} must be a number or a comma-separated list") from None
        masked.update(steps=counts[0], stage_steps=counts)
    MaskedSamplingConfig.from_dict(masked)
    if args.n < 1:
        raise ConfigError(f"--n={args.n} must be at least 1")
    values = args.prompt or args.class_
    ckpt = args.ckpt
    if ckpt is None:
        from .assets import shipped_model_path
        ckpt = shipped_model_path(args.model)
    outs = generate_to_file(ckpt, values, args.n, given, args.out, use_ema=not args.no_ema,
                            device=args.device, batch_size=args.batch_size, save_scales=args.save_scales, flow=flow,
                            masked_given=masked, duration=args.duration, rescore_ckpt=args.rescore_ckpt,
                            hybrid_seconds=args.hybrid_seconds)
    print(f"wrote {', '.join(map(str, outs))}")


def _quickstart(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart
    report = run_quickstart(Path(args.out), scale=args.scale)
    print(f"quickstart done in {report['wall_s']:.0f} s; see {args.out}/README.txt")


def _demo(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from .demo.app import launch
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise ConfigError("the demo needs gradio: pip install -e \".[demo]\"") from None
    launch(args.ckpt, host=args.host, port=args.port, concurrency=args.concurrency, device=args.device)


def _setup(args: argparse.Namespace) -> None:
    from .demo.browser import BrowserSetupError, install_browser
    try:
        chromium, driver = install_browser()
    except BrowserSetupError as err:
        raise ConfigError(str(err)) from None
    print(f"browser ready: {chromium}, {driver}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint, folder_megabytes
    from .model_card import write_model_card
    out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, sampling=args.sampling)
    if args.card_title:
        write_model_card(out, args.card_title, args.card_data, [Path(r) for r in args.recipe],
                         [Path(m) for m in args.metrics], args.card_notes)
    print(f"exported {args.ckpt} to {out} ({folder_megabytes(out):.1f} MB)")


def build_parser() -> argparse.ArgumentParser:
    from .assets import DEFAULT_MODEL, SHIPPED_MODELS
    from .data.commands import register as register_data
    from .eval.commands import register as register_eval
    from .samplers.flow import FlowSamplingConfig
    from .samplers.logits import SamplingConfig
    from .samplers.masked import MaskedSamplingConfig
    parser = argparse.ArgumentParser(prog="tessera", description="Autoregressive and masked generation on one trunk.")
    sub = parser.add_subparsers(dest="command", required=True)
    register_data(sub)

    p = sub.add_parser("train", help="train a model from a recipe: tessera train --config X.yaml [key=value ...]")
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.config.trunk.dim=128")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample a PNG grid (images) or WAV files (audio) from a checkpoint")
    p.add_argument("--ckpt", default=None, help="checkpoint folder or run folder (default: the shipped --model)")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(SHIPPED_MODELS),
                   help=f"shipped default model used without --ckpt (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", action="append", help="caption (repeatable; cycled over the batch)")
    p.add_argument("--class", dest="class_", action="append", help="class name or index (repeatable)")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--out", default="samples.png", help="output PNG grid, or WAV path for audio models")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--save-scales", default=None, metavar="PNG",
                   help="next-scale models: also write the coarse-to-fine strip (a row per sample, a column per scale)")
    p.add_argument("--duration", type=float, default=None, help="audio models: seconds to generate")
    p.add_argument("--rescore-ckpt", default=None, help="MAGNeT: a next_token_streams model on the same codec that "
                   "rescores tokens (weight --masked-rescore-weight, default 0.3 here) and starts hybrid decoding")
    p.add_argument("--hybrid-seconds", type=float, default=None,
                   help="MAGNeT: generate the first seconds autoregressively with --rescore-ckpt, the rest masked")
    p.add_argument("--steps", default=None, help="masked models: decoding steps (MaskGIT), or per stream "
                                                 "coarse to fine for MAGNeT, e.g. 20,10,10,10")
    add_config_flags(p, SamplingConfig)
    add_config_flags(p, FlowSamplingConfig, "flow-")
    add_config_flags(p, MaskedSamplingConfig, "masked-")
    p.set_defaults(func=_sample)

    register_eval(sub)

    p = sub.add_parser("export", help="copy a checkpoint's EMA weights in float16 for shipping (+ MODEL_CARD.md)")
    p.add_argument("--ckpt", required=True, help="checkpoint folder or run folder")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 or float32")
    p.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE",
                   help="recommended sampling setting stored with the model, e.g. cfg=3 or masked.steps=12 (repeatable)")
    p.add_argument("--card-title", default="", help="write MODEL_CARD.md with this title")
    p.add_argument("--card-data", default="", help="model card: the training data, in a sentence")
    p.add_argument("--card-notes", default="", help="model card: notes")
    p.add_argument("--recipe", action="append", default=[], help="model card: a recipe used, in order (repeatable)")
    p.add_argument("--metrics", action="append", default=[], help="model card: a JSON metrics report (repeatable)")
    p.set_defaults(func=_export)

    p = sub.add_parser("quickstart", help="make shapes data, train a tiny VQ + next-token model, sample (CPU, minutes)")
    p.add_argument("--out", default="quickstart")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the default steps/data (tests use less)")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("demo", help="serve the Gradio demo over the default models and --ckpt folders")
    p.add_argument("--ckpt", action="append", default=[], help="generator checkpoint or run folder (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency", type=int, default=2, help="generations run at once; more wait in the queue")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("setup", help="install system tools: `tessera setup browser` (chromium for the demo tests)")
    p.add_argument("what", choices=["browser"], help="browser: apt-get install chromium chromium-driver (root)")
    p.set_defaults(func=_setup)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"tessera: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
