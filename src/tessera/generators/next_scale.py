"""Next-scale generation (VAR): every scale of a multi-scale VQ in one block-causal sequence.

Scale 0 is a start token per position (learned, plus the pooled condition); scale k > 0 is fed
the running reconstruction f_hat of scales < k, area-downsampled to scale k's size. Each token
carries a learned scale-level embedding and 2-D RoPE coordinates on the final grid, so a coarse
token sits at the centre of the region it covers. The condition (class or pooled caption)
also drives AdaLN in every block.
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
from .base import Condition, ScaleWiseGenerator, load_frozen_tokenizer
from .conditioning import ConditionedConfig
from .heads import TokenHead


@dataclass
class NextScaleConfig(ConditionedConfig):
    """VAR over a `multiscale_vq` tokenizer (its scale schedule is the sequence layout)."""

    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    tokenizer: str = ""  # multiscale_vq checkpoint folder; copied into this model's checkpoint
    scale_loss_weights: list[float] = field(default_factory=list)  # per scale; empty: every token alike

    def validate(self) -> None:
        super().validate()
        if not self.tokenizer:
            raise ConfigError("next_scale needs tokenizer: a multiscale_vq checkpoint folder")
        if any(w < 0 for w in self.scale_loss_weights):
            raise ConfigError(f"scale_loss_weights={self.scale_loss_weights} must be non-negative")


class NextScaleGenerator(ScaleWiseGenerator):
    """Block-causal transformer predicting all tokens of scale k from scales < k."""

    kind = "next_scale"
    config_class = NextScaleConfig
    asset_fields = ("tokenizer", "text_tokenizer")
    frozen_submodules = ("tokenizer",)
    presets = {
        "tiny": {"trunk": {"dim": 64, "n_layers": 2, "n_heads": 4}},
        "small": {"trunk": {"dim": 384, "n_layers": 8, "n_heads": 6}},
        # VAR-d16: depth 16, width 64 * depth, heads = depth.
        "d16": {"trunk": {"dim": 1024, "n_layers": 16, "n_heads": 16}},
    }

    def __init__(self, config: NextScaleConfig):
        if config.trunk.cond_dim != config.trunk.dim:  # AdaLN on the pooled condition, always
            config = config.replace(trunk={**config.trunk.to_dict(), "cond_dim": config.trunk.dim})
        super().__init__(config)
        from ..tokenizers.multiscale import MultiScaleVQ
        self.tokenizer = load_frozen_tokenizer(config.tokenizer, MultiScaleVQ, self.kind)
        scales = self.tokenizer.scales
        if config.scale_loss_weights and len(config.scale_loss_weights) != len(scales):
            raise ConfigError(f"scale_loss_weights has {len(config.scale_loss_weights)} entries; the tokenizer at "
                              f"{config.tokenizer} has {len(scales)} scales {scales}")
        dim = config.trunk.dim
        self.scales, self.vocab_size = scales, self.tokenizer.vocab_size
        self.sizes = [pn * pn for pn in scales]
        self.starts = [sum(self.sizes[:k]) for k in range(len(scales))]
        self.seq_len = sum(self.sizes)
        self.has_condition = config.cond != "none"
        self.prefix = config.make_prefix(dim)
        self.pos_start = nn.Parameter(torch.randn(self.sizes[0], dim) * 0.02)
        self.word_embed = nn.Linear(self.tokenizer.config.code_dim, dim)
        self.level_embed = nn.Embedding(len(scales), dim)
        nn.init.normal_(self.level_embed.weight, std=0.02)
        self.trunk = Trunk(config.trunk)
        self.head = TokenHead(dim, self.vocab_size)
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
        return AttentionMask("block_causal", block_ids=self.levels)

    # ----- embeddings ------------------------------------------------------------------------------
    def condition_vector(self, cond: Condition, drop: torch.Tensor) -> torch.Tensor:
        """(B, dim): the condition tokens (null where `drop`) mean-pooled."""
        if isinstance(cond, torch.Tensor):
            cond = cond.to(drop.device)
        return self.prefix(cond, drop).mean(1)

    def scale_tokens(self, cond_vec: torch.Tensor, f_hat: torch.Tensor | None, k: int) -> torch.Tensor:
        """(B', pn_k^2, dim) inputs of scale k: start tokens for k = 0, else embedded f_hat (of the
        first B rows, repeated to `cond_vec`'s batch B' for CFG) downsampled to scale k."""
        if k == 0:
            x = self.pos_start[None] + cond_vec[:, None]
        else:
            inp = self.tokenizer.next_input(f_hat, k - 1)
            x = self.word_embed(inp.flatten(2).transpose(1, 2).to(self.word_embed.weight.dtype))
            x = x.repeat(cond_vec.shape[0] // x.shape[0], 1, 1)
        return x + self.level_embed.weight[k]

    def teacher_sequence(self, cond_vec: torch.Tensor, codes: list[torch.Tensor]) -> torch.Tensor:
        """(B, L, dim) training inputs for every scale from the ground-truth code maps."""
        inputs = self.tokenizer.teacher_inputs(codes)
        rest = torch.cat([x.flatten(2).transpose(1, 2) for x in inputs], 1) if inputs else None
        first = self.scale_tokens(cond_vec, None, 0)
        if rest is None:
            return first
        rest = self.word_embed(rest.to(self.word_embed.weight.dtype)) + self.level_embed(self.levels[self.sizes[0]:])
        return torch.cat([first, rest.to(first.dtype)], 1)

    # ----- forward passes ----------------------------------------------------------------------------
    def logits_upto(self, x: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        """Uncached: inputs of scales 0..k (B, sum pn^2, dim) -> logits (B, same, V)."""
        length = x.shape[1]
        h = self.trunk(x, self.rope_positions[:length], self.mask, cond=cond_vec)
        return self.head(h)

    def new_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return self.trunk.new_cache(batch_size, self.seq_len, dtype, device)

    def scale_logits(self, x: torch.Tensor, k: int, cond_vec: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached: scale k's inputs (B, pn_k^2, dim) attend to themselves and the cached coarser
        scales; writes their keys/values; logits (B, pn_k^2, V)."""
        start, end = self.starts[k], self.starts[k] + self.sizes[k]
        positions = torch.arange(start, end, device=x.device)
        h = self.trunk(x.to(cache.dtype), self.rope_positions[start:end], self.mask, cond=cond_vec.to(cache.dtype),
                       cache=cache, positions=positions, kv_len=end)
        return self.head(h)

    # ----- training ----------------------------------------------------------------------------------
    def batch_codes(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Ground-truth code maps per scale, from `tokens` (B, L) or encoded from `image`."""
        if "tokens" in batch:
            return self.tokenizer.split_scales(batch["tokens"])
        return self.tokenizer.encode_scales(batch["image"])

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = self.batch_codes(batch)
        b = codes[0].shape[0]
        device = codes[0].device
        drop = torch.rand(b, device=device) < self.config.cond_drop if self.training else \
            torch.zeros(b, dtype=torch.bool, device=device)
        cond_vec = self.condition_vector(self.batch_condition(batch), drop)
        logits = self.logits_upto(self.teacher_sequence(cond_vec, codes), cond_vec)
        targets = torch.cat([c.flatten(1) for c in codes], 1)
        per_token = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none",
                                                label_smoothing=self.config.label_smoothing)
        logs: dict[str, torch.Tensor] = {}
        for k, (start, size) in enumerate(zip(self.starts, self.sizes)):
            logs[f"ce_s{k}"] = per_token[:, start:start + size].detach().mean()
        weights = self.config.scale_loss_weights
        if weights:
            token_weights = torch.tensor(weights, device=device)[self.levels] / torch.tensor(self.sizes, device=device)[self.levels]
            loss = (per_token * token_weights).sum(1).mean() / sum(weights)
        else:
            loss = per_token.mean()
        logs["acc"] = (logits.argmax(-1) == targets).float().mean().detach()
        return loss, logs

    # ----- output ------------------------------------------------------------------------------------
    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        """(B, L) codes of every scale -> images."""
        return self.tokenizer.decode(units)

    def parse_condition(self, values: list[str] | None, n: int) -> Condition:
        return self.prefix.parse(values, n)
