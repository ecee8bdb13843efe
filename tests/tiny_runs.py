"""A tiny training run for trainer tests: shapes shards, a random tiny VQ and a recipe over them."""
import sys
from pathlib import Path
from typing import Any

import torch

from tessera.cli import main
from tessera.registry import build_model
from tessera.train.recipe import Recipe


def tiny_recipe(folder: Path, kind: str = "next_token", images: int = 48, per_shard: int = 5000,
                data: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> Recipe:
    """Shards of `images` 32px scenes and a tiny VQ in `folder`, and a recipe training a tiny
    unconditional `kind` generator on them (`data` / `train` fields override the defaults)."""
    assert main(["data", "shapes", "--n", str(images), "--res", "32", "--per-shard", str(per_shard),
                 "--out", str(folder / "shards")]) == 0
    torch.manual_seed(0)
    build_model("vq", "tiny").save_pretrained(folder / "vq")
    return Recipe.from_dict({
        "model": {"kind": kind, "preset": "tiny", "config": {"tokenizer": str(folder / "vq"), "cond": "none",
                                                              "image_size": 32}},
        "data": {"shards": str(folder / "shards"), "shuffle_buffer": 0, **(data or {})},
        "train": {"batch_size": 4, "log_every": 1, "sample_every": 0, **(train or {})},
        "out": str(folder / "run")})


def nan_losses_at(steps: set[int]) -> None:
    """Make the next-token generator's loss NaN at the given (0-based) training steps (the `__main__`
    below does it in processes started by `accelerate launch`, which pytest's monkeypatch cannot reach)."""
    from tessera.generators.next_token import NextTokenGenerator
    real_loss = NextTokenGenerator.loss

    def sometimes_nan(self, batch):
        loss, logs = real_loss(self, batch)
        return (loss * float("nan"), logs) if batch["step"] in steps else (loss, logs)

    NextTokenGenerator.loss = sometimes_nan


if __name__ == "__main__":  # `tiny_runs.py STEPS ARGS...`: `tessera ARGS...` with NaN losses at STEPS (e.g. 1,2)
    nan_losses_at({int(s) for s in sys.argv[1].split(",")})
    sys.exit(main(sys.argv[2:]))
