"""Training state under DeepSpeed ZeRO without pickles.

Each rank writes its own partition of the optimizer state (fp32 master weights, AdamW moments, the
param groups' hyperparameters) as a partition file (`partitions.py`) inside the checkpoint, and
copies it back in place on resume. Under ZeRO-3, whose parameters are sharded, `Zero3Layout`
moves between full tensors (model.safetensors, ema.safetensors) and this rank's shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import CheckpointError
from ..modeling import TesseraModel
from .partitions import read_partition, write_partition

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

FORMAT = "tessera-zero-optimizer-1"


def _masters(engine: DeepSpeedEngine) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per (sub-)group, as the inner optimizer steps them."""
    zero = engine.optimizer
    return list(zero.fp32_partitioned_groups_flat if engine.zero_optimization_stage() == 3
                else zero.single_partition_of_fp32_groups)


def _group(engine: DeepSpeedEngine, index: int) -> dict[str, Any]:
    """The inner optimizer's param group that master partition `index` belongs to."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        index = zero.sub_group_to_group_id[index]
    return zero.optimizer.param_groups[index]


def write_optimizer_partition(engine: DeepSpeedEngine, folder: Path) -> None:
    """Write this rank's optimizer partition into `folder` (a temporary name, then a rename)."""
    rank, world, stage = dist.get_rank(), dist.get_world_size(), engine.zero_optimization_stage()
    inner = engine.optimizer.optimizer
    tensors: dict[str, torch.Tensor] = {}
    masters = _masters(engine)
    for i, master in enumerate(masters):
        tensors[f"master.{i}"] = master.detach()
        for key, value in inner.state.get(master, {}).items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}; only tensors are saved")
            tensors[f"state.{i}.{key}"] = value.detach()
    meta = {"format": FORMAT, "stage": stage, "world": world, "rank": rank,
            "partitions": [m.numel() for m in masters], "dtypes": [str(m.dtype) for m in masters],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]}
    write_partition(folder, {k: v.contiguous().cpu() for k, v in tensors.items()}, meta)


def load_optimizer_partition(engine: DeepSpeedEngine, checkpoint: Path) -> bool:
    """Copy this rank's saved partition back in place, and the 16-bit weights from the restored fp32
    masters; False when `checkpoint` holds no partitions (saved without DeepSpeed, or by an older tessera)."""
    stage = engine.zero_optimization_stage()
    found = read_partition(checkpoint, FORMAT, "ZeRO")
    if found is None:
        return False
    path, meta = found
    if meta["stage"] != stage:
        raise CheckpointError(f"{path} was saved under ZeRO-{meta['stage']}, this launch runs ZeRO-{stage}: "
                              f"resume with the DeepSpeed config it was saved with")
    masters = _masters(engine)
    sizes = [m.numel() for m in masters]
    if meta["partitions"] != sizes or meta["dtypes"] != [str(m.dtype) for m in masters]:
        raise CheckpointError(f"{path} holds partitions of {meta['partitions']} {meta['dtypes']} elements; this "
                              f"model's are {sizes} {[str(m.dtype) for m in masters]} (another model or config?)")
    tensors = load_file(str(path))
    inner = engine.optimizer.optimizer
    for i, master in enumerate(masters):
        group = _group(engine, i)
        master.data.copy_(tensors[f"master.{i}"])
        prefix, state = f"state.{i}.", {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                # Adam keeps `step` on the CPU unless fused or capturable; the moments live beside the master.
                cpu_step = name == "step" and not (group.get("fused") or group.get("capturable"))
                state[name] = value if cpu_step else value.to(master.device)
        inner.state[master] = state
    for group, saved in zip(inner.param_groups, meta["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    _refresh_16bit_weights(engine, masters)
    return True


@torch.no_grad()
def _refresh_16bit_weights(engine: DeepSpeedEngine, masters: list[torch.Tensor]) -> None:
    """Set the model's 16-bit weights from the fp32 masters (a collective call), as DeepSpeed's own load does."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:  # the parameters' shards are views into these flat buffers
        for flat, master in zip(zero.fp16_partitioned_groups_flat, masters):
            flat.copy_(master)
    else:
        zero.update_lp_params()


def keep_frozen_whole(model: TesseraModel, device: torch.device) -> None:
    """Keep frozen submodules (a generator's tokenizer) out of ZeRO-3's parameter partitioning: ZeRO-3
    gathers a shard only around its module's `forward`, but a tokenizer's `encode` reads weights directly
    (the VQ codebook). They become plain attributes on `device`, outside `parameters()` and DeepSpeed's
    hooks; `trainable_state_dict()` never held them."""
    for name in model.frozen_submodules:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            delattr(model, name)
            object.__setattr__(model, name, module.to(device))


class Zero3Layout:
    """A ZeRO-3 model's sharded weights: each rank holds a flat, zero-padded 1/world slice of every
    parameter (`param.ds_tensor`). Maps trainable-state dicts between full tensors and this rank's shards."""

    def __init__(self, model: TesseraModel):
        self.model = model
        keys = set(model.trainable_state_dict())
        self.params = {name: p for name, p in model.named_parameters(remove_duplicate=False)
                       if name in keys and hasattr(p, "ds_tensor")}

    def live(self) -> dict[str, torch.Tensor]:
        """The trainable state, with each sharded parameter as this rank's shard."""
        return {k: self.params[k].ds_tensor if k in self.params else v
                for k, v in self.model.trainable_state_dict().items()}

    def shard(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (full tensors) with each sharded parameter cut down to this rank's shard of rank 0's
        tensor (a collective call: ranks may differ, e.g. seeded apart, and DeepSpeed kept rank 0's weights)."""
        out = dict(state)
        for name, p in self.params.items():
            group = p.ds_process_group
            size, rank, world = p.ds_tensor.numel(), dist.get_rank(group=group), dist.get_world_size(group=group)
            full = state[name].to(p.ds_tensor.device, copy=True).contiguous()
            dist.broadcast(full, src=dist.get_global_rank(group, 0), group=group)
            flat = full.reshape(-1)
            out[name] = torch.cat([flat, flat.new_zeros(size * world - flat.numel())])[rank * size:(rank + 1) * size]
        return out

    def gather(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """`state` (shards) with every sharded parameter gathered into its full tensor, on the CPU of
        rank 0 (None on the other ranks); a collective call, one parameter at a time."""
        main = dist.get_rank() == 0
        out = {}
        for name, value in state.items():
            p = self.params.get(name)
            if p is None:
                out[name] = value.detach().contiguous().cpu()
                continue
            group = p.ds_process_group
            dst, shard = dist.get_global_rank(group, 0), value.detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group=group))] \
                if dist.get_rank() == dst else None
            dist.gather(shard, parts, dst=dst, group=group)
            if main:
                out[name] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()
        return out if main else None
