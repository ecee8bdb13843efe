"""Training checkpoints: model + EMA + optimizer/scheduler/RNG state, written atomically."""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import LATEST_FILE, atomic_directory, atomic_write_text
from ..modeling import TesseraModel

TRAIN_STATE_FILE = "train_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA RNG states as plain data (bytes, ints, lists),
    which crosses processes (gather) and loads with `weights_only=True`."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tobytes(), *(v.item() if hasattr(v, "item") else v for v in np_state[2:])],
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _byte_tensor(state: bytes | torch.Tensor) -> torch.Tensor:
    return state if isinstance(state, torch.Tensor) else torch.frombuffer(bytearray(state), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (also the tensor form of older checkpoints)."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.frombuffer(keys, dtype=np.uint32).copy()
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def save_training_checkpoint(run_dir: Path, model: TesseraModel, ema_state: dict[str, torch.Tensor],
                             train_state: dict[str, Any], keep: int, weights: dict[str, torch.Tensor] | None = None,
                             fill: Callable[[Path], None] | None = None) -> Path:
    """Write `checkpoints/step-N/` atomically, point `latest` at it, prune old ones. `weights` replace
    the model's own in model.safetensors (ZeRO-3 gathers them from shards); `fill` adds files to the
    folder before it appears (every rank's optimizer partition under DeepSpeed)."""
    ckpt_root = run_dir / "checkpoints"
    name = f"step-{train_state['step']:07d}"
    with atomic_directory(ckpt_root / name) as tmp:
        model.write_into(tmp, ema_state=ema_state, extra={"step": train_state["step"]}, weights=weights)
        if fill is not None:
            fill(tmp)
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
    atomic_write_text(ckpt_root / LATEST_FILE, name)
    steps = sorted(p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt_root / name


def load_train_state(ckpt: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state beside a checkpoint (tensors and plain data only)."""
    return torch.load(ckpt / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
