"""Optimizer partition files: under DeepSpeed ZeRO and FSDP each rank writes its share of the
optimizer state as `optimizer-rank{r}-of-{world}.safetensors` inside a checkpoint (staged, then
moved in by the main process) and reads its own back on resume, with the same number of processes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError

OPTIMIZER_FILE = "optimizer-rank{rank}-of-{world}.safetensors"
SAVED_WORLD = re.compile(r"^optimizer-rank\d+-of-(\d+)\.safetensors$")


def optimizer_file(rank: int, world: int) -> str:
    """The name of rank `rank`'s optimizer partition in a checkpoint saved by `world` ranks."""
    return OPTIMIZER_FILE.format(rank=rank, world=world)


def write_partition(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write this rank's optimizer partition file into `folder` (a temporary name, then a rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / optimizer_file(meta["rank"], meta["world"])
    tmp = folder / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    save_file(tensors, str(tmp), metadata={"tessera": json.dumps(meta)})
    os.replace(tmp, path)


def saved_worlds(checkpoint: Path) -> list[int]:
    """The numbers of processes that wrote optimizer partitions into `checkpoint` (none: saved whole)."""
    return sorted({int(m[1]) for f in checkpoint.iterdir() if (m := SAVED_WORLD.match(f.name))})


def saved_partition(checkpoint: Path, rank: int, world: int) -> Path | None:
    """This rank's optimizer partition in `checkpoint`; None when it holds none; an error when they were
    saved by another number of processes."""
    path = checkpoint / optimizer_file(rank, world)
    if path.is_file():
        return path
    worlds = saved_worlds(checkpoint)
    if not worlds:
        return None
    raise CheckpointError(f"{checkpoint} has no {path.name}: its optimizer partitions were saved by "
                          f"{' and '.join(map(str, worlds))} processes, this launch has {world}")


def read_partition(checkpoint: Path, form: str, what: str) -> tuple[Path, dict[str, Any]] | None:
    """This rank's partition file in `checkpoint` and its metadata, checked to be of format `form`
    (a `what` optimizer partition); None when the checkpoint holds none."""
    path = saved_partition(checkpoint, dist.get_rank(), dist.get_world_size())
    if path is None:
        return None
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("tessera", "{}"))
    if meta.get("format") != form:
        raise CheckpointError(f"{path} is not a tessera {what} optimizer partition (format {meta.get('format')!r}): "
                              "resume with the launch config it was saved with")
    return path, meta


def move_optimizer_partitions(staging: Path, checkpoint: Path, world: int) -> None:
    """Move every rank's partition from `staging` into `checkpoint` (a folder not yet in place), then
    remove `staging` (with any files a crashed launch of another size left there)."""
    for rank in range(world):
        name = optimizer_file(rank, world)
        os.replace(staging / name, checkpoint / name)
    shutil.rmtree(staging)
