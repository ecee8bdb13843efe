"""Test-only program: `tessera ARGS...` with accelerate's FSDP switched on for gloo CPU processes.

accelerate enables FSDP for GPU backends only (a CPU launch of fsdp.yaml falls back to no distributed
mode), while torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo. After accelerate has chosen
MULTI_CPU, this turns the state into FSDP with the plugin the launcher's environment describes, so the
trainer's FSDP path (sharded EMA, gathered weights, per-rank optimizer shards) runs under pytest.
"""
import sys

import accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from tessera.cli import main

_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
