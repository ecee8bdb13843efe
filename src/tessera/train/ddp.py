"""How a DDP launch wraps the model: the recipe's gradient bucket size and static graph, and an
optional bf16 all-reduce of the gradients (torch's own bf16 hook needs NCCL; this one runs over
gloo as well, so the CPU tests drive it)."""
# No `from __future__ import annotations` here: DDP checks a hook's annotations against the real types.

import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs

from .recipe import TrainSection


def ddp_kwargs(t: TrainSection) -> DistributedDataParallelKwargs:
    """DDP's settings from the recipe; gradients are kept as views of the buckets (no copy per step)."""
    return DistributedDataParallelKwargs(bucket_cap_mb=t.ddp_bucket_mb, gradient_as_bucket_view=True,
                                         static_graph=t.ddp_static_graph)


def bf16_all_reduce(group: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: average the bucket across ranks in bf16 (half the bytes of float32),
    then write the mean back into the float32 bucket."""
    group = group if group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    wire = buffer.div(group.size()).to(torch.bfloat16)
    reduced = dist.all_reduce(wire, group=group, async_op=True).get_future()

    def unpack(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        return buffer.copy_(future.value()[0])

    return reduced.then(unpack)
