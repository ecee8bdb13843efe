"""Raster-order next-token generation (LlamaGen-style), with an optional Token-Shuffle window."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, check_range
from ..nn.cache import KVCache
from ..nn.masks import AttentionMask
from ..nn.trunk import Trunk, TrunkConfig
from .base import AutoregressiveGenerator, load_frozen_tokenizer
from .conditioning import ConditionedConfig
from .heads import FusedLossConfig, TokenHead, head_cross_entropy
from .token_shuffle import TokenShuffle, tokens_to_units, units_to_tokens


@dataclass
class NextTokenConfig(ConditionedConfig, FusedLossConfig):
    """Next-token generator over a VQ tokenizer's token grid."""

    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    tokenizer: str = ""  # VQ checkpoint folder; copied into this model's checkpoint
    image_size: int = 32
    vocab_size: int = 0  # 0: taken from the tokenizer
    grid_size: int = 0  # token grid side; 0: taken from the tokenizer
    token_shuffle: int = 1  # window s: s*s tokens merged per trunk position
    z_loss: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("token_shuffle", self.token_shuffle, 1, 8)
        if not self.tokenizer and (self.vocab_size <= 0 or self.grid_size <= 0):
            raise ConfigError("without a tokenizer, set vocab_size and grid_size explicitly")
        if self.grid_size and self.grid_size % self.token_shuffle:
            raise ConfigError(f"grid_size={self.grid_size} is not divisible by token_shuffle={self.token_shuffle}")


def _tiny_trunk(**kw) -> dict[str, Any]:
    return {"dim": 64, "n_layers": 2, "n_heads": 4, **kw}


class NextTokenGenerator(AutoregressiveGenerator):
    """Condition prefix + raster image tokens through the trunk with a causal mask."""

    kind = "next_token"
    config_class = NextTokenConfig
    asset_fields = ("tokenizer", "text_tokenizer")
    frozen_submodules = ("tokenizer",)
    presets = {
        "tiny": {"trunk": _tiny_trunk()},
        "small": {"trunk": {"dim": 384, "n_layers": 8, "n_heads": 6}},
        "gpt-b": {"trunk": {"dim": 768, "n_layers": 12, "n_heads": 12}},
        "gpt-l": {"trunk": {"dim": 1024, "n_layers": 24, "n_heads": 16}},
        "gpt-xl": {"trunk": {"dim": 1280, "n_layers": 36, "n_heads": 20}},
    }

    def __init__(self, config: NextTokenConfig):
        super().__init__(config)
        if config.tokenizer:
            from ..tokenizers.vq import VQTokenizer
            self.tokenizer = load_frozen_tokenizer(config.tokenizer, VQTokenizer, self.kind)
            vocab, (grid, _) = self.tokenizer.vocab_size, self.tokenizer.token_grid(config.image_size)
            for name, given, actual in (("vocab_size", config.vocab_size, vocab), ("grid_size", config.grid_size, grid)):
                if given and given != actual:
                    raise ConfigError(f"{name}={given} does not match the tokenizer at {config.tokenizer} ({actual})")
            config = self.config = config.replace(vocab_size=vocab, grid_size=grid)
        else:
            self.tokenizer = None
        dim, s = config.trunk.dim, config.token_shuffle
        self.grid, self.s = config.grid_size, s
        self.unit_size = s * s
        self.n_units = (config.grid_size // s) ** 2
        self.has_condition = config.cond != "none"
        self.prefix = config.make_prefix(dim)
        self.token_embedding = nn.Embedding(config.vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.shuffle = TokenShuffle(dim, s) if s > 1 else None
        self.trunk = Trunk(config.trunk)
        self.head = TokenHead(dim, config.vocab_size)
        units = torch.arange(self.n_units)
        side = config.grid_size // s
        unit_rope = torch.stack([units // side, units % side], -1).float()
        if config.trunk.rope_axes != 2:
            raise ConfigError("next_token uses 2-D RoPE: set trunk.rope_axes=2")
        # RoPE coordinates: prefix tokens at the origin (identity rotation), unit j at its window's (row, col).
        rope = torch.cat([torch.zeros(self.prefix.length, 2), unit_rope])
        self.register_buffer("rope_positions", rope, persistent=False)

    # ----- embedding / head ----------------------------------------------------------------------
    def _embed_units(self, units: torch.Tensor) -> torch.Tensor:
        emb = self.token_embedding(units)  # (B, n, s^2, dim)
        return emb[:, :, 0] if self.shuffle is None else self.shuffle.shuffle(emb)

    def _unit_features(self, h: torch.Tensor) -> torch.Tensor:
        """Trunk outputs (B, n, dim) -> the head's inputs (B, n, s^2, dim) per token of each unit."""
        return h[:, :, None] if self.shuffle is None else self.shuffle.unshuffle(h)

    def _unit_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self._unit_features(h))  # (B, n, s^2, V)

    @property
    def tokens_per_sample(self) -> int:
        return self.n_units * self.unit_size

    # ----- protocol used by samplers ----------------------------------------------------------------
    def logits_all(self, prefix: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return self._unit_logits(self._hidden_all(prefix, units))

    def _hidden_all(self, prefix: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Trunk outputs predicting units 0..n (B, n + 1, dim) after `prefix` and units 0..n-1."""
        p = prefix.shape[1]
        x = torch.cat([prefix, self._embed_units(units).to(prefix.dtype)], dim=1)
        return self.trunk(x, self.rope_positions[: x.shape[1]], AttentionMask.causal())[:, p - 1:]

    def prefill(self, prefix: torch.Tensor, cache: KVCache) -> torch.Tensor:
        p = prefix.shape[1]
        h = self.trunk(prefix, self.rope_positions[:p], AttentionMask.causal(), cache=cache,
                       positions=torch.arange(p, device=prefix.device))
        return self._unit_logits(h[:, -1:])[:, 0]

    def decode_step(self, unit: torch.Tensor, index: int | torch.Tensor, cache: KVCache,
                    kv_len: int | None = None) -> torch.Tensor:
        pos = torch.as_tensor(index, device=unit.device).reshape(1) + self.prefix_length
        x = self._embed_units(unit[:, None]).to(cache.dtype)
        h = self.trunk(x, self.rope_positions[pos], AttentionMask.causal(), cache=cache, positions=pos, kv_len=kv_len)
        return self._unit_logits(h)[:, 0]

    # ----- training ----------------------------------------------------------------------------------
    def units_from_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, n_units, unit_size) targets: given `tokens` (B, H, W) or encoded from `image`."""
        if "tokens" in batch:
            tokens = batch["tokens"]
        elif self.tokenizer is not None:
            with torch.no_grad():
                tokens = self.tokenizer.encode(batch["image"])
        else:
            raise ConfigError("this next_token model has no tokenizer: batches must carry 'tokens'")
        if tokens.shape[1:] != (self.grid, self.grid):
            raise ConfigError(f"token grid {tuple(tokens.shape[1:])} does not match the model's {self.grid}x{self.grid}")
        return tokens_to_units(tokens, self.s)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        units = self.units_from_batch(batch)
        cond = self.batch_condition(batch)
        b = units.shape[0]
        h = self._hidden_all(self.prefix_embeddings(cond, self.condition_dropout(b, units.device)), units[:, :-1])
        c = self.config
        return head_cross_entropy(self.head, self._unit_features(h), units, c.label_smoothing, c.z_loss, c.loss_chunk,
                                  c.loss_kernel)

    # ----- output -----------------------------------------------------------------------------------
    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        tokens = units_to_tokens(units, self.grid, self.s)
        if self.tokenizer is None:
            raise ConfigError("this next_token model has no tokenizer to decode images with")
        return self.tokenizer.decode(tokens)

