"""Training state under FSDP2 (`fully_shard`) without pickles.

Each trainable parameter is a DTensor sharded over the ranks. `FsdpLayout` moves trainable-state
dicts between full tensors (model.safetensors, ema.safetensors) and this rank's local shards, like
`Zero3Layout` does under ZeRO-3. Each rank writes the local shards of its AdamW moments as
`optimizer-rank{r}-of-{world}.safetensors` inside the checkpoint and reads them back on resume,
so a resume needs the same number of processes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoint import CheckpointError
from ..modeling import TesseraModel
from .partitions import read_partition, write_partition

FORMAT = "tessera-fsdp-optimizer-1"


class FsdpLayout:
    """An FSDP2 model's sharded trainable parameters; maps state dicts between full tensors and local shards."""

    def __init__(self, model: TesseraModel):
        self.model = model
        keys = set(model.trainable_state_dict())
        self.params = {name: p for name, p in model.named_parameters() if name in keys and isinstance(p, DTensor)}

    def live(self) -> dict[str, torch.Tensor]:
        """The trainable state, with each sharded parameter as this rank's local shard."""
        return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in self.model.trainable_state_dict().items()}

    def shard(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (full tensors) with each sharded parameter cut to this rank's shard of rank 0's tensor
        (a collective call)."""
        out = dict(state)
        for name, p in self.params.items():
            full = state[name].to(p.to_local().device, copy=True)
            out[name] = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=0).to_local()
        return out

    def gather(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """`state` (local shards) with every sharded parameter gathered into its full tensor, on the CPU
        of rank 0 (None on the other ranks); a collective call."""
        out = {}
        for name, value in state.items():
            p = self.params.get(name)
            if p is not None:
                value = DTensor.from_local(value.detach(), p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride()).full_tensor()
            out[name] = value.detach().contiguous().cpu()
        return out if dist.get_rank() == 0 else None


def write_optimizer_shards(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write this rank's AdamW state (local shards of the moments, step counts, hyperparameters) into
    `folder` (a temporary name, then a rename)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors: dict[str, torch.Tensor] = {}
    params = [p for group in inner.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for key, value in inner.state.get(p, {}).items():
            local = value.to_local() if isinstance(value, DTensor) else value
            tensors[f"state.{i}.{key}"] = local.detach().contiguous().cpu()
    meta = {"format": FORMAT, "world": world, "rank": rank, "shapes": [list(_local(p).shape) for p in params],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]}
    write_partition(folder, tensors, meta)


def load_optimizer_shards(optimizer: torch.optim.Optimizer, checkpoint: Path) -> bool:
    """Put this rank's saved AdamW state back; False when `checkpoint` holds none (saved without FSDP)."""
    found = read_partition(checkpoint, FORMAT, "FSDP")
    if found is None:
        return False
    path, meta = found
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    shapes = [list(_local(p).shape) for p in params]
    if meta["shapes"] != shapes:
        raise CheckpointError(f"{path} holds optimizer shards of other shapes than this model's (another model or config?)")
    tensors = load_file(str(path))
    for i, p in enumerate(params):
        prefix, state = f"state.{i}.", {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if isinstance(p, DTensor) and value.shape == _local(p).shape and value.dim() > 0:
                    state[name] = DTensor.from_local(value.to(_local(p).device), p.device_mesh, p.placements,
                                                     shape=p.shape, stride=p.stride())
                else:  # the step count (on the parameter's device: the optimizer is fused)
                    state[name] = value.to(_local(p).device)
        if state:
            inner.state[p] = state
    for group, saved in zip(inner.param_groups, meta["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    return True


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p
