"""Export a trained checkpoint for shipping: its EMA weights as `model.safetensors` in a smaller
float dtype, nested checkpoints (the tokenizer inside a generator) alike, training state dropped."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CONFIG_FILE, EMA_WEIGHTS_FILE, WEIGHTS_FILE, CheckpointError, atomic_directory, \
    resolve_checkpoint
from .config import ConfigError

EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def recommended_sampling(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """{"sampling": {...}, "masked": {...}} from `key=value` pairs (`masked.key=value` for masked
    decoding), validated by the sampling configs."""
    from .samplers.logits import SamplingConfig
    from .samplers.masked import MaskedSamplingConfig
    out: dict[str, dict[str, Any]] = {"sampling": {}, "masked": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--sampling {pair!r} must look like key=value (masked.key=value for masked decoding)")
        section, _, name = key.rpartition(".")
        if section not in ("", "masked"):
            raise ConfigError(f"--sampling {pair!r}: only masked.KEY may carry a prefix")
        out[section or "sampling"][name] = value
    parsed = {"sampling": SamplingConfig.from_dict(out["sampling"]), "masked": MaskedSamplingConfig.from_dict(out["masked"])}
    return {section: {k: getattr(parsed[section], k) for k in values} for section, values in out.items() if values}


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "float16",
                      sampling: list[str] | None = None) -> Path:
    """Copy the checkpoint (or a run's latest) to `out`, keeping only its inference weights (the EMA
    ones where present) with floating tensors cast to `dtype`, and the recommended sampling settings
    (`key=value`, see `recommended_sampling`) in its `config.json`; written atomically."""
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"--dtype={dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    recommended = recommended_sampling(sampling or [])
    source = resolve_checkpoint(ckpt)
    with atomic_directory(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("train_state*", "optimizer*", ".*"))
        for header in sorted(tmp.rglob(CONFIG_FILE)):
            used = _shrink_weights(header.parent, EXPORT_DTYPES[dtype])
            data = json.loads(header.read_text())
            data["export"] = {"weights": used, "dtype": dtype, "source": str(source)}
            if header.parent == tmp and recommended:
                data["sampling"] = recommended
            header.write_text(json.dumps(data, indent=2))
    return Path(out)


def _shrink_weights(folder: Path, dtype: torch.dtype) -> str:
    """Replace the folder's weights by its EMA weights (if any) cast to `dtype`; returns which were kept."""
    ema, weights = folder / EMA_WEIGHTS_FILE, folder / WEIGHTS_FILE
    chosen = ema if ema.is_file() else weights
    if not chosen.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    state = load_file(str(chosen))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(weights))
    ema.unlink(missing_ok=True)
    return "ema" if chosen == ema else "model"


def folder_megabytes(path: str | Path) -> float:
    """Size of every file under `path`, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
