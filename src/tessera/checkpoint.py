"""The one checkpoint format: a folder with `config.json` + `model.safetensors`.

Folders are written under a temporary name and renamed into place, so a crash never leaves
a half-written checkpoint where a complete one was expected. Only safetensors are read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
LATEST_FILE = "latest"


class CheckpointError(ValueError):
    """A path that is not a usable tessera checkpoint."""


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, or a run folder whose `checkpoints/latest` names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / "checkpoints" / LATEST_FILE
    if latest.is_file():
        return resolve_checkpoint(path / "checkpoints" / latest.read_text().strip())
    raise CheckpointError(f"{path} is not a tessera checkpoint (no {CONFIG_FILE}, no checkpoints/{LATEST_FILE})")


def read_header(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint folder (kind, config, format)."""
    path = resolve_checkpoint(path)
    try:
        header = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {err}") from None
    if not isinstance(header, dict) or "kind" not in header or "config" not in header:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a tessera checkpoint header (needs 'kind' and 'config')")
    return header


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
