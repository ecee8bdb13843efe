"""Masked generation on the shared trunk (bidirectional): MaskGIT over an image VQ's token grid, and
MAGNeT over an audio codec's K token streams.

Both put the condition tokens first and the (partly masked) tokens after them; a learned mask
token (id = vocab size) stands for unknown positions, and the loss is cross-entropy on the masked
positions only, with the mask ratio drawn through a schedule per sample. MAGNeT trains one stream
(codebook stage) per batch: lower streams visible, higher streams fully masked, span masking on
its own stream, and restricted attention (a band of +-`stage_context` frames) above stream 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, check_range
from ..nn.masks import AttentionMask
from ..nn.trunk import Trunk, TrunkConfig
from .base import Generator, load_frozen_tokenizer
from .conditioning import ConditionedConfig
from .heads import FusedLossConfig, TokenHead, head_cross_entropy
from .masking import MaskSchedule, mask_ratio, random_token_mask, span_mask


@dataclass
class MaskedConfig(ConditionedConfig, FusedLossConfig):
    """Fields every masked generator shares."""

    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    tokenizer: str = ""  # tokenizer checkpoint folder; copied into this model's checkpoint
    mask_schedule: MaskSchedule = "cosine"  # training mask ratio gamma(r), r ~ U(0, 1)

    def validate(self) -> None:
        super().validate()
        if not self.tokenizer:
            raise ConfigError("a masked generator needs tokenizer: a tokenizer checkpoint folder")
        mask_ratio(self.mask_schedule, torch.zeros(1))  # names a bad schedule


class MaskedGenerator(Generator):
    """Base of MaskGIT and MAGNeT: condition prefix, trunk, mask token, masked cross-entropy."""

    asset_fields = ("tokenizer", "text_tokenizer")
    frozen_submodules = ("tokenizer",)
    presets = {
        "tiny": {"trunk": {"dim": 64, "n_layers": 2, "n_heads": 4}},
        "small": {"trunk": {"dim": 384, "n_layers": 8, "n_heads": 6}},
        "base": {"trunk": {"dim": 768, "n_layers": 12, "n_heads": 12}},
    }

    def _build(self, vocab_size: int, rope_axes: int) -> None:
        config = self.config
        if config.trunk.rope_axes != rope_axes:
            raise ConfigError(f"{self.kind} uses {rope_axes}-D RoPE: set trunk.rope_axes={rope_axes}")
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.has_condition = config.cond != "none"
        self.prefix = config.make_prefix(config.trunk.dim)
        self.trunk = Trunk(config.trunk)

    def training_prefix(self, batch: dict[str, Any], b: int, device: torch.device) -> torch.Tensor:
        return self.prefix_embeddings(self.batch_condition(batch), self.condition_dropout(b, device))

    def hidden(self, prefix: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Trunk outputs of the token part for condition tokens `prefix` followed by token inputs `x`."""
        seq = torch.cat([prefix, x.to(prefix.dtype)], 1)
        return self.trunk(seq, positions, mask)[:, prefix.shape[1]:]

    def draw_ratios(self, b: int, device: torch.device) -> torch.Tensor:
        return mask_ratio(self.config.mask_schedule, torch.rand(b, device=device))

    def masked_cross_entropy(self, h: torch.Tensor, head: TokenHead, targets: torch.Tensor,
                             where: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean CE (with label smoothing) of `head` over the trunk outputs `h` at the positions in
        `where` (logits of those rows only; fused when `loss_chunk`), and its accuracy."""
        loss, logs = head_cross_entropy(head, h[where], targets[where], self.config.label_smoothing,
                                        chunk=self.config.loss_chunk, kernel=self.config.loss_kernel)
        return loss, {"acc": logs["acc"], "masked_frac": where.float().mean().detach()}


@dataclass
class MaskGITConfig(MaskedConfig):
    image_size: int = 32


class MaskGITGenerator(MaskedGenerator):
    """MaskGIT: the whole token grid predicted at once under a bidirectional mask, 2-D RoPE."""

    kind = "maskgit"
    config_class = MaskGITConfig

    def __init__(self, config: MaskGITConfig):
        super().__init__(config)
        from ..tokenizers.vq import VQTokenizer
        self.tokenizer = load_frozen_tokenizer(config.tokenizer, VQTokenizer, self.kind)
        self.grid = self.tokenizer.token_grid(config.image_size)[0]
        self.n_tokens = self.grid * self.grid
        self._build(self.tokenizer.vocab_size, rope_axes=2)
        self.token_embedding = nn.Embedding(self.vocab_size + 1, config.trunk.dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.head = TokenHead(config.trunk.dim, self.vocab_size)
        cells = torch.arange(self.n_tokens)
        rope = torch.cat([torch.zeros(self.prefix.length, 2),
                          torch.stack([cells // self.grid, cells % self.grid], -1).float()])
        self.register_buffer("rope_positions", rope, persistent=False)

    @property
    def tokens_per_sample(self) -> int:
        return self.n_tokens

    def masked_logits(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) tokens with `mask_id` where unknown -> logits (B, N, V) at every position."""
        return self.head(self.masked_hidden(prefix, tokens))

    def masked_hidden(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) tokens with `mask_id` where unknown -> trunk outputs (B, N, dim)."""
        return self.hidden(prefix, self.token_embedding(tokens), self.rope_positions, AttentionMask.bidirectional())

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "tokens" in batch:
            tokens = batch["tokens"].flatten(1)
        else:
            with torch.no_grad():
                tokens = self.tokenizer.encode(batch["image"]).flatten(1)
        b, device = tokens.shape[0], tokens.device
        masked = random_token_mask(self.draw_ratios(b, device), self.n_tokens)
        h = self.masked_hidden(self.training_prefix(batch, b, device), tokens.masked_fill(masked, self.mask_id))
        loss, logs = self.masked_cross_entropy(h, self.head, tokens, masked)
        return loss, {"ce": loss.detach(), **logs}

    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(units.view(-1, self.grid, self.grid))


@dataclass
class MAGNeTConfig(MaskedConfig):
    clip_seconds: float = 5.0  # training crop and the longest duration it generates
    span: int = 3  # span length of the training mask (frames)
    stage_context: int = 5  # streams above 0 attend to +-stage_context frames (MAGNeT's restricted context)

    def validate(self) -> None:
        super().validate()
        check_range("clip_seconds", self.clip_seconds, 0.0, low_open=True)
        check_range("span", self.span, 1)
        check_range("stage_context", self.stage_context, 0)


class MAGNeTGenerator(MaskedGenerator):
    """MAGNeT: K codec streams, summed per-stream embeddings, one head per stream, 1-D RoPE over frames."""

    kind = "magnet"
    modality = "audio"
    config_class = MAGNeTConfig
    presets = {name: {"trunk": {**p["trunk"], "rope_axes": 1}} for name, p in MaskedGenerator.presets.items()}

    def __init__(self, config: MAGNeTConfig):
        super().__init__(config)
        from ..tokenizers.audio import AudioCodec
        self.tokenizer = load_frozen_tokenizer(config.tokenizer, AudioCodec, self.kind)
        self.num_streams = self.tokenizer.config.num_codebooks
        self.max_frames = round(config.clip_seconds * self.tokenizer.frame_rate)
        self.frames = self.max_frames
        self._build(self.tokenizer.vocab_size, rope_axes=1)
        dim = config.trunk.dim
        self.stream_embeddings = nn.ModuleList(nn.Embedding(self.vocab_size + 1, dim)
                                               for _ in range(self.num_streams))
        for table in self.stream_embeddings:
            nn.init.normal_(table.weight, std=0.02)
        self.heads = nn.ModuleList(TokenHead(dim, self.vocab_size) for _ in range(self.num_streams))

    @property
    def sample_rate(self) -> int:
        return self.tokenizer.sample_rate

    @property
    def clip_seconds(self) -> float:
        return self.config.clip_seconds

    @property
    def tokens_per_sample(self) -> int:
        return self.num_streams * self.frames

    def set_duration(self, seconds: float) -> None:
        """Generate `seconds` of audio from now on (at most the trained context)."""
        frames = round(seconds * self.tokenizer.frame_rate)
        if not 1 <= frames <= self.max_frames:
            raise ConfigError(f"duration {seconds} s is outside this model's range: between "
                              f"{1 / self.tokenizer.frame_rate:.3f} s and its trained context of {self.clip_seconds} s")
        self.frames = frames

    def stage_mask(self, stage: int, prefix_length: int) -> AttentionMask:
        if stage == 0:
            return AttentionMask.bidirectional()
        return AttentionMask.band(self.config.stage_context, n_sink=prefix_length)

    def stage_logits(self, prefix: torch.Tensor, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """(B, K, T) codes (`mask_id` where unknown) -> logits (B, T, V) of stream `stage`."""
        return self.heads[stage](self.stage_hidden(prefix, codes, stage))

    def stage_hidden(self, prefix: torch.Tensor, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """(B, K, T) codes -> trunk outputs (B, T, dim) under stream `stage`'s attention mask."""
        x = sum(table(codes[:, k]) for k, table in enumerate(self.stream_embeddings))
        p, t = prefix.shape[1], codes.shape[-1]
        positions = torch.cat([torch.zeros(p, device=codes.device), torch.arange(t, device=codes.device)])[:, None]
        return self.hidden(prefix, x, positions.float(), self.stage_mask(stage, p))

    def batch_codes(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (B, K, T), valid frames (B, T)) from `codes` or encoded from `audio` (+ `lengths`)."""
        if "codes" in batch:
            codes = batch["codes"]
            return codes, torch.ones(codes.shape[0], codes.shape[-1], dtype=torch.bool, device=codes.device)
        with torch.no_grad():
            codes = self.tokenizer.encode(batch["audio"])
        t = codes.shape[-1]
        lengths = batch.get("lengths")
        if lengths is None:
            return codes, torch.ones(codes.shape[0], t, dtype=torch.bool, device=codes.device)
        frames = (lengths.to(codes.device) + self.tokenizer.hop_length - 1) // self.tokenizer.hop_length
        return codes, torch.arange(t, device=codes.device)[None] < frames[:, None]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes, valid = self.batch_codes(batch)
        b, k_streams, t = codes.shape
        device = codes.device
        stage = int(torch.randint(k_streams, (1,)).item())
        masked = span_mask(self.draw_ratios(b, device), t, self.config.span) & valid
        inputs = codes.clone()
        inputs[:, stage] = codes[:, stage].masked_fill(masked, self.mask_id)
        inputs[:, stage + 1:] = self.mask_id
        h = self.stage_hidden(self.training_prefix(batch, b, device), inputs, stage)
        where = masked if masked.any() else valid
        loss, logs = self.masked_cross_entropy(h, self.heads[stage], codes[:, stage], where)
        return loss, {"ce": loss.detach(), **logs}

    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(units)
