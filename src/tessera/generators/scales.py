"""What VAR and FlowAR share: every scale in one block-causal sequence on the trunk.

Scale 0 is a start token per position (learned, plus the pooled condition); scale k > 0 gets
an input map (B, C, pn_k, pn_k) made by the subclass from scales < k, projected to the trunk
width. Each token carries a learned scale-level embedding and 2-D RoPE coordinates on the final
grid, so a coarse token sits at the centre of the region it covers. The pooled condition
(class or caption) also drives AdaLN in every block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..nn.cache import KVCache
from ..nn.masks import AttentionMask
from ..nn.trunk import Trunk, TrunkConfig
from .base import Condition, ScaleWiseGenerator
from .conditioning import ConditionedConfig


@dataclass
class ScaleSequenceConfig(ConditionedConfig):
    """Fields shared by scale-wise generators."""

    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    tokenizer: str = ""  # tokenizer checkpoint folder; copied into this model's checkpoint
    scale_loss_weights: list[float] = field(default_factory=list)  # per scale; empty: every token alike

    def validate(self) -> None:
        super().validate()
        if not self.tokenizer:
            raise ConfigError("a scale-wise generator needs tokenizer: a tokenizer checkpoint folder")
        if any(w < 0 for w in self.scale_loss_weights):
            raise ConfigError(f"scale_loss_weights={self.scale_loss_weights} must be non-negative")


class ScaleSequenceGenerator(ScaleWiseGenerator):
    """Base of next-scale (VAR) and FlowAR: layout, embeddings, trunk passes, cache, loss weights."""

    asset_fields = ("tokenizer", "text_tokenizer")
    frozen_submodules = ("tokenizer",)
    presets = {
        "tiny": {"trunk": {"dim": 64, "n_layers": 2, "n_heads": 4}},
        "small": {"trunk": {"dim": 384, "n_layers": 8, "n_heads": 6}},
        # VAR-d16: depth 16, width 64 * depth, heads = depth.
        "d16": {"trunk": {"dim": 1024, "n_layers": 16, "n_heads": 16}},
    }

    def __init__(self, config: ScaleSequenceConfig):
        if config.trunk.cond_dim != config.trunk.dim:  # AdaLN on the pooled condition, always
            config = config.replace(trunk={**config.trunk.to_dict(), "cond_dim": config.trunk.dim})
        super().__init__(config)

    def _build_sequence(self, scales: list[int], input_channels: int) -> None:
        """Create the layout and the trunk for `scales` (each input map has `input_channels`)."""
        config = self.config
        if config.scale_loss_weights and len(config.scale_loss_weights) != len(scales):
            raise ConfigError(f"scale_loss_weights has {len(config.scale_loss_weights)} entries; the tokenizer at "
                              f"{config.tokenizer} gives {len(scales)} scales {scales}")
        dim = config.trunk.dim
        self.scales = list(scales)
        self.sizes = [pn * pn for pn in scales]
        self.starts = [sum(self.sizes[:k]) for k in range(len(scales))]
        self.seq_len = sum(self.sizes)
        self.has_condition = config.cond != "none"
        self.prefix = config.make_prefix(dim)
        self.pos_start = nn.Parameter(torch.randn(self.sizes[0], dim) * 0.02)
        self.input_proj = nn.Linear(input_channels, dim)
        self.level_embed = nn.Embedding(len(scales), dim)
        nn.init.normal_(self.level_embed.weight, std=0.02)
        self.trunk = Trunk(config.trunk)
        side = scales[-1]
        coords = [torch.stack(torch.meshgrid(torch.arange(pn), torch.arange(pn), indexing="ij"), -1).reshape(-1, 2)
                  .float().add(0.5).mul(side / pn).sub(0.5) for pn in scales]
        self.register_buffer("rope_positions", torch.cat(coords), persistent=False)
        levels = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor(self.sizes))
        self.register_buffer("levels", levels, persistent=False)

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    @property
    def mask(self) -> AttentionMask:
        """Block-causal over scales (on the model's device)."""
        return AttentionMask("block_causal", block_ids=self.levels, block_sizes=tuple(self.sizes))

    # ----- embeddings ------------------------------------------------------------------------------
    def condition_vector(self, cond: Condition, drop: torch.Tensor) -> torch.Tensor:
        """(B, dim): the condition tokens (null where `drop`) mean-pooled."""
        return self.prefix_embeddings(cond, drop).mean(1)

    def training_condition(self, batch: dict[str, Any], b: int, device: torch.device) -> torch.Tensor:
        """The batch's pooled condition, dropped to null with probability `cond_drop` in training."""
        return self.condition_vector(self.batch_condition(batch), self.condition_dropout(b, device))

    def embed_inputs(self, maps: torch.Tensor, k: int) -> torch.Tensor:
        """(B, C, pn_k, pn_k) input map of scale k -> (B, pn_k^2, dim) tokens."""
        x = self.input_proj(maps.flatten(2).transpose(1, 2).to(self.input_proj.weight.dtype))
        return x + self.level_embed.weight[k]

    def start_tokens(self, cond_vec: torch.Tensor) -> torch.Tensor:
        return self.pos_start[None] + cond_vec[:, None] + self.level_embed.weight[0]

    def scale_tokens(self, cond_vec: torch.Tensor, state: torch.Tensor | None, k: int) -> torch.Tensor:
        if k == 0:
            return self.start_tokens(cond_vec)
        x = self.embed_inputs(self.next_input_map(state, k), k)
        return x.repeat(cond_vec.shape[0] // x.shape[0], 1, 1)

    def next_input_map(self, state: torch.Tensor, k: int) -> torch.Tensor:
        """(B, C, pn_k, pn_k) input of scale k from the sampling state after scale k - 1."""
        raise NotImplementedError

    def teacher_sequence(self, cond_vec: torch.Tensor, input_maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, L, dim): start tokens, then the embedded input maps of scales 1..K-1."""
        parts = [self.start_tokens(cond_vec)] + [self.embed_inputs(m, k + 1) for k, m in enumerate(input_maps)]
        return torch.cat([p.to(parts[0].dtype) for p in parts], 1)

    # ----- trunk passes ------------------------------------------------------------------------------
    def hidden_upto(self, x: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        """Uncached trunk outputs for the inputs of scales 0..k (B, sum pn^2, dim)."""
        return self.trunk(x, self.rope_positions[: x.shape[1]], self.mask, cond=cond_vec)

    def new_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return self.trunk.new_cache(batch_size, self.seq_len, dtype, device)

    def scale_hidden(self, x: torch.Tensor, k: int, cond_vec: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached: scale k's tokens attend to themselves and the cached coarser scales (their keys
        and values are written to the cache); trunk outputs (B, pn_k^2, dim)."""
        start, end = self.starts[k], self.starts[k] + self.sizes[k]
        positions = torch.arange(start, end, device=x.device)
        return self.trunk(x.to(cache.dtype), self.rope_positions[start:end], self.mask, cond=cond_vec.to(cache.dtype),
                          cache=cache, positions=positions, kv_len=end)

    # ----- loss helpers ------------------------------------------------------------------------------
    def combine_scale_losses(self, per_scale: list[torch.Tensor], prefix: str) -> tuple[torch.Tensor, dict]:
        """Weighted mean of per-scale mean losses (weights: `scale_loss_weights`, else each scale by
        its token count, i.e. every token alike); logs each as `{prefix}_s{k}`."""
        weights = self.config.scale_loss_weights or [float(n) for n in self.sizes]
        total = sum(w * loss for w, loss in zip(weights, per_scale)) / sum(weights)
        return total, {f"{prefix}_s{k}": loss.detach() for k, loss in enumerate(per_scale)}

    def token_loss_weights(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch * L,) weights w with sum_i w_i * loss_i equal to `combine_scale_losses` of the
        per-scale mean losses (for losses computed row by row, e.g. the fused cross-entropy)."""
        weights = self.config.scale_loss_weights or [float(n) for n in self.sizes]
        per_scale = [w / (sum(weights) * n * batch) for w, n in zip(weights, self.sizes)]
        row = torch.cat([torch.full((n,), w, device=device) for w, n in zip(per_scale, self.sizes)])
        return row.repeat(batch)

    def split_by_scale(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """(B, L, ...) -> one (B, pn_k^2, ...) slice per scale."""
        return list(per_token.split(self.sizes, 1))

