"""A training recipe: which model, which data, how to train, where to write."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import Config, check_range


@dataclass
class ModelSection(Config):
    """The model to build: registry kind, optional preset, and config fields on top."""

    kind: str = "next_token"
    preset: str = ""
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection(Config):
    shards: str = ""
    resolution: int = 0  # images: 0 = the model's image_size
    clip_seconds: float = 0.0  # audio: crop length; 0 = the model's clip_seconds
    shuffle_buffer: int = 1000
    num_workers: int = 0


@dataclass
class TrainSection(Config):
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500  # 0 disables preview grids
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False  # recompute each trunk block in backward (less memory, ~1/3 more compute)
    compile: bool = False  # torch.compile the trunk's blocks
    # torch.compile mode: "reduce-overhead" and "max-autotune" replay the blocks as CUDA graphs;
    # the "max-autotune" modes also try Triton matmul templates with fused epilogues (slow to compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Inductor's coordinate-descent search of its generated kernels' block sizes, in any mode (the
    # max-autotune modes have it): a few seconds more compilation; the blocks' AdaLN-gradient reductions
    # ran 18% faster on VAR-d16 (H200), the whole step 0.4% (H100, batch 96)
    compile_tuning: bool = True
    # Programmatic dependent launch of Inductor's Triton kernels (Hopper and newer): each may start
    # while the kernel before it finishes, waiting only where it reads that kernel's output. Off by
    # default, as in torch; +0.6% tokens/s on VAR-d16 at batch 128 (H100). No effect on other GPUs.
    compile_pdl: bool = False
    # DDP launches only: the gradient all-reduce bucket size (torch's default is 25 MB), a static graph
    # (DDP's bookkeeping done once), and bf16 all-reduce (half the traffic; each rank's gradients and
    # the optimizer stay float32)
    ddp_bucket_mb: int = 25
    ddp_static_graph: bool = False
    ddp_bf16_gradients: bool = False
    max_bad_steps: int = 5  # a non-finite gradient skips the update; this many in a row stop training
    seed: int = 0

    def validate(self) -> None:
        check_range("train.steps", self.steps, 1)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.grad_accum", self.grad_accum, 1)
        check_range("train.lr", self.lr, 0.0, low_open=True)
        check_range("train.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_range("train.warmup_steps", self.warmup_steps, 0)
        check_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        check_range("train.log_every", self.log_every, 1)
        check_range("train.ckpt_every", self.ckpt_every, 1)
        check_range("train.max_bad_steps", self.max_bad_steps, 1)
        check_range("train.ddp_bucket_mb", self.ddp_bucket_mb, 1)


@dataclass
class Recipe(Config):
    """What `tessera train --config FILE [key=value ...]` reads."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    out: str = "runs/default"
