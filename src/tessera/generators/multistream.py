"""Multi-stream next-token generation over an audio codec's K code streams (MusicGen-style).

The codec's (B, K, T) codes are laid out by a codebook interleaving pattern (`patterns.py`:
`delay` by default, `parallel`, `flattened`, `coarse_first`) as S steps of U slots. One trunk
position per step: its input is the *sum* of the U slots' embeddings (one table of
vocab_size + 1 rows per codebook, the last row being that codebook's special/pad token), and its
output predicts the next step's U slots, each through the head of that slot's codebook.
Sequence layout as for every `AutoregressiveGenerator`: [condition prefix][steps 0..S-2]; the
output at the last prefix slot predicts step 0. RoPE is 1-D: prefix tokens at position 0
(identity rotation), step s at position s + 1.

Invalid (hole) slots of the pattern hold the special id `vocab_size`. The sampler draws every
slot from the V code logits, holes included; those draws are never used: every unit fed back
(`decode_step`, `logits_all`) has its hole slots replaced by the special id from the pattern's
valid mask for those steps, and `decode_units` ignores them when reverting the pattern. The
logits of hole slots are left as they are (not masked). The training loss is the CE over valid
slots only (and only frames inside each clip's real length), logged per codebook as `ce_q{k}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, check_range
from ..nn.cache import KVCache
from ..nn.masks import AttentionMask
from ..nn.trunk import Trunk, TrunkConfig
from . import patterns
from .base import AutoregressiveGenerator, load_frozen_tokenizer
from .conditioning import ConditionedConfig
from .heads import TokenHead
from .patterns import PatternName


def _trunk_1d() -> TrunkConfig:
    return TrunkConfig(rope_axes=1)


@dataclass
class StreamNextTokenConfig(ConditionedConfig):
    """Next-token generator over an audio codec's K parallel code streams."""

    trunk: TrunkConfig = field(default_factory=_trunk_1d)
    tokenizer: str = ""  # audio_codec checkpoint folder; copied into this model's checkpoint
    pattern: PatternName = "delay"
    num_codebooks: int = 0  # the first K streams of the codec; 0: all of them
    vocab_size: int = 0  # codes per stream; 0: taken from the tokenizer
    clip_seconds: float = 10.0  # training crop and the longest duration the model may generate
    z_loss: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.trunk.rope_axes != 1:
            raise ConfigError(f"next_token_streams uses 1-D RoPE over sequence steps: set trunk.rope_axes=1 "
                              f"(got {self.trunk.rope_axes})")
        check_range("clip_seconds", self.clip_seconds, 0.0, low_open=True)
        check_range("num_codebooks", self.num_codebooks, 0)
        check_range("vocab_size", self.vocab_size, 0)
        check_range("z_loss", self.z_loss, 0.0)


def _trunk(dim: int, n_layers: int, n_heads: int) -> dict[str, Any]:
    return {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "rope_axes": 1}


class StreamNextTokenGenerator(AutoregressiveGenerator):
    """Condition prefix + pattern-interleaved codec streams through the trunk with a causal mask.

    `set_duration(seconds)` chooses how much audio sampling produces (at most `clip_seconds`,
    the trained context); `n_units` is the pattern's step count for that many frames and
    `unit_size` its slots per step. `sample(cond, sampler)` returns waveforms (B, 1, samples).
    """

    kind = "next_token_streams"
    modality = "audio"
    config_class = StreamNextTokenConfig
    asset_fields = ("tokenizer", "text_tokenizer")
    frozen_submodules = ("tokenizer",)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"trunk": _trunk(64, 2, 4), "clip_seconds": 0.25},
        "small": {"trunk": _trunk(512, 8, 8), "clip_seconds": 5.0},
        "medium": {"trunk": _trunk(1024, 24, 16), "clip_seconds": 10.0},
    }

    def __init__(self, config: StreamNextTokenConfig):
        super().__init__(config)
        if not config.tokenizer:
            raise ConfigError("next_token_streams needs `tokenizer`: an audio_codec checkpoint folder "
                              "(e.g. runs/codec_audio)")
        from ..tokenizers.audio import AudioCodec
        self.tokenizer = load_frozen_tokenizer(config.tokenizer, AudioCodec, self.kind)
        codec_k, vocab = self.tokenizer.config.num_codebooks, self.tokenizer.vocab_size
        if config.num_codebooks > codec_k:
            raise ConfigError(f"num_codebooks={config.num_codebooks} exceeds the {codec_k} streams of the codec "
                              f"at {config.tokenizer}")
        if config.vocab_size and config.vocab_size != vocab:
            raise ConfigError(f"vocab_size={config.vocab_size} does not match the codec at {config.tokenizer} ({vocab})")
        config = self.config = config.replace(num_codebooks=config.num_codebooks or codec_k, vocab_size=vocab)
        k, dim = config.num_codebooks, config.trunk.dim
        self.num_codebooks, self.special = k, vocab
        self.pattern = config.pattern
        self.unit_size = patterns.slots(self.pattern, k)
        self.has_condition = config.cond != "none"
        self.prefix = config.make_prefix(dim)
        # K tables of vocab + 1 rows stored end to end: code v of codebook k is row k * (vocab + 1) + v.
        self.token_embedding = nn.Embedding(k * (vocab + 1), dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.trunk = Trunk(config.trunk)
        self.heads = nn.ModuleList(TokenHead(dim, vocab) for _ in range(k))
        self.max_frames = self.frames_for(config.clip_seconds)
        max_steps = patterns.steps(self.pattern, k, self.max_frames)
        # Per-step tables over the longest context (+1 row: the step after the last). The slot ->
        # codebook map does not depend on T (slot u is codebook u, or step s % K when flattened).
        codebook = patterns.codebook_index(self.pattern, k, self.max_frames)
        codebook = torch.cat([codebook, (codebook[-1:] + 1) % k if self.pattern == "flattened" else codebook[-1:]])
        self.register_buffer("step_offsets", codebook * (vocab + 1), persistent=False)
        self.register_buffer("step_codebook", codebook, persistent=False)
        rope = torch.cat([torch.zeros(self.prefix.length), torch.arange(1, max_steps + 2).float()])
        self.register_buffer("rope_positions", rope, persistent=False)
        # Valid slots of the current duration's steps (rows past its last step: all holes); rewritten
        # in place by set_duration, so its address never changes.
        self.register_buffer("step_valid", torch.zeros(max_steps + 1, self.unit_size, dtype=torch.bool),
                             persistent=False)
        self.set_duration(config.clip_seconds)

    # ----- duration --------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.tokenizer.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.tokenizer.frame_rate

    @property
    def clip_seconds(self) -> float:
        return self.config.clip_seconds

    def frames_for(self, seconds: float) -> int:
        """Code frames covering `seconds` of audio (ceil(samples / hop))."""
        return self.tokenizer.num_frames(round(seconds * self.sample_rate))

    def set_duration(self, seconds: float) -> None:
        """Generate `seconds` of audio from now on (n_units follows); at most `clip_seconds`.

        Build a new sampler after changing it (a sampler may keep a KV cache sized for the old
        `n_units`). `coarse_first` models should generate their full `clip_seconds`: their fine
        streams start at step T, which moves with the duration (audiocraft gives the same warning).
        """
        if not seconds > 0:
            raise ConfigError(f"duration must be > 0 s, got {seconds}")
        if seconds > self.clip_seconds * (1 + 1e-9):
            raise ConfigError(f"a duration of {seconds} s is longer than the model's trained context of "
                              f"{self.clip_seconds} s (clip_seconds); generate at most that much")
        self.duration = float(seconds)
        self.num_samples = max(round(seconds * self.sample_rate), 1)
        self.num_frames = self.tokenizer.num_frames(self.num_samples)
        self.n_units = patterns.steps(self.pattern, self.num_codebooks, self.num_frames)
        valid = patterns.valid_mask(self.pattern, self.num_codebooks, self.num_frames)
        self.step_valid.zero_()
        self.step_valid[: self.n_units].copy_(valid)

    @property
    def tokens_per_sample(self) -> int:
        """Codes per clip of the current duration (K * frames)."""
        return self.num_codebooks * self.num_frames

    # ----- embedding / heads ---------------------------------------------------------------------
    def _embed_units(self, units: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """units (B, n, U) at sequence steps `steps` (n,) -> (B, n, dim): sum of the slots' embeddings."""
        return self.token_embedding(units + self.step_offsets[steps]).sum(2)

    def _step_logits(self, h: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Outputs h (B, n, dim) predicting steps `steps` (n,) -> logits (B, n, U, V)."""
        if self.pattern != "flattened":  # slot u is codebook u
            return torch.stack([head(h) for head in self.heads], 2)
        every = torch.stack([head(h) for head in self.heads], 2)  # (B, n, K, V)
        index = self.step_codebook[steps][None, :, :, None].expand(h.shape[0], -1, -1, every.shape[-1])
        return every.gather(2, index)

    def _fill_holes(self, units: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The special id in the pattern's hole slots of units (B, n, U) at steps (n,)."""
        return torch.where(self.step_valid[steps], units, torch.full_like(units, self.special))

    def _sequence_logits(self, prefix: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        p, n = prefix.shape[1], units.shape[1]
        if n + 1 > self.step_codebook.shape[0]:
            raise ConfigError(f"{n} steps exceed the model's context ({self.step_codebook.shape[0] - 1} steps "
                              f"for clip_seconds={self.clip_seconds})")
        steps = torch.arange(n + 1, device=prefix.device)
        x = torch.cat([prefix, self._embed_units(units, steps[:n]).to(prefix.dtype)], dim=1)
        h = self.trunk(x, self.rope_positions[: p + n], AttentionMask.causal())
        return self._step_logits(h[:, p - 1:], steps)

    # ----- protocol used by samplers ----------------------------------------------------------------
    def logits_all(self, prefix: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(units.shape[1], device=units.device)
        return self._sequence_logits(prefix, self._fill_holes(units, steps))

    def prefill(self, prefix: torch.Tensor, cache: KVCache) -> torch.Tensor:
        p = prefix.shape[1]
        h = self.trunk(prefix, self.rope_positions[:p], AttentionMask.causal(), cache=cache,
                       positions=torch.arange(p, device=prefix.device))
        return self._step_logits(h[:, -1:], torch.zeros(1, dtype=torch.long, device=prefix.device))[:, 0]

    def decode_step(self, unit: torch.Tensor, index: int | torch.Tensor, cache: KVCache,
                    kv_len: int | None = None) -> torch.Tensor:
        step = torch.as_tensor(index, device=unit.device).reshape(1)
        pos = step + self.prefix_length
        x = self._embed_units(self._fill_holes(unit[:, None], step), step).to(cache.dtype)
        h = self.trunk(x, self.rope_positions[pos], AttentionMask.causal(), cache=cache, positions=pos, kv_len=kv_len)
        return self._step_logits(h, step + 1)[:, 0]

    # ----- training ----------------------------------------------------------------------------------
    def codes_from_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (B, K, T), real frames (B,)): given `codes` or encoded from `audio`; frames past
        `lengths` (samples, optional) are zero padding."""
        k = self.num_codebooks
        if "codes" in batch:
            codes = batch["codes"]
            if codes.dim() != 3 or codes.shape[1] < k:
                raise ConfigError(f"batch codes of shape {tuple(codes.shape)} do not hold (B, {k}, frames) streams")
            codes = codes[:, :k]
        else:
            codes = self.tokenizer.encode(batch["audio"], k)
        b, _, t = codes.shape
        if t > self.max_frames:
            raise ConfigError(f"a batch of {t} frames is longer than the model's trained context of "
                              f"{self.clip_seconds} s ({self.max_frames} frames); crop the clips or raise clip_seconds")
        lengths = batch.get("lengths")
        if lengths is None:
            real = torch.full((b,), t, dtype=torch.long, device=codes.device)
        else:
            real = (lengths.to(codes.device) + self.tokenizer.hop_length - 1) // self.tokenizer.hop_length
        return codes, real.clamp(max=t)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes, real = self.codes_from_batch(batch)
        t = codes.shape[-1]
        # Frames past a clip's end become holes: no loss there, and they read like the end of a shorter clip.
        inside = torch.arange(t, device=codes.device)[None, None, :] < real[:, None, None]
        codes = torch.where(inside, codes, torch.full_like(codes, self.special))
        seq, _ = patterns.build(codes, self.pattern, self.special)
        b = seq.shape[0]
        prefix = self.prefix_embeddings(self.batch_condition(batch), self.condition_dropout(b, seq.device))
        logits = self._sequence_logits(prefix, seq[:, :-1]).float()  # (B, S, U, V)
        target = seq != self.special
        ce = F.cross_entropy(logits.flatten(0, 2), seq.clamp(max=self.special - 1).flatten(),
                             label_smoothing=self.config.label_smoothing, reduction="none").view_as(seq)
        mask = target.float()
        codebook = self.step_codebook[: seq.shape[1]]  # (S, U)
        onehot = F.one_hot(codebook, self.num_codebooks).float()  # (S, U, K)
        per_k = torch.einsum("bsu,suk->k", ce * mask, onehot) / torch.einsum("bsu,suk->k", mask, onehot).clamp_min(1)
        loss = per_k.mean()
        with torch.no_grad():
            correct = (logits.argmax(-1) == seq).float() * mask
            logs: dict[str, torch.Tensor] = {"ce": loss.detach(), "acc": correct.sum() / mask.sum().clamp_min(1)}
            for k in range(self.num_codebooks):
                logs[f"ce_q{k}"] = per_k[k].detach()
        if self.config.z_loss > 0:
            zl = (torch.logsumexp(logits, -1).pow(2) * mask).sum() / mask.sum().clamp_min(1)
            loss = loss + self.config.z_loss * zl
            logs["z_loss"] = zl.detach()
        return loss, logs

    # ----- output -----------------------------------------------------------------------------------
    def units_to_codes(self, units: torch.Tensor) -> torch.Tensor:
        """Sampled units (B, S, U) -> codes (B, K, T) through the pattern."""
        frames = patterns.frames(self.pattern, self.num_codebooks, units.shape[1])
        return patterns.revert(units, self.pattern, frames, self.num_codebooks)

    @torch.no_grad()
    def code_log_probs(self, prefix: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities (B, K, T) of codes (B, K, T) after condition tokens `prefix`
        (`special` may stand for codes not known yet; their own entries are meaningless)."""
        sequence, _ = patterns.build(codes, self.pattern, self.special)
        logits = self.logits_all(prefix, sequence[:, :-1]).float()
        picked = logits.log_softmax(-1).gather(-1, sequence.clamp(max=self.special - 1)[..., None])[..., 0]
        return patterns.revert(picked, self.pattern, codes.shape[-1], self.num_codebooks)

    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        """Units (B, S, U) -> codes (B, K, T) through the pattern -> waveforms (B, 1, samples)."""
        codes = self.units_to_codes(units)
        frames = codes.shape[-1]
        if codes.min() < 0 or codes.max() >= self.special:
            raise ValueError(f"units hold ids outside [0, {self.special}) in valid slots of the {self.pattern} pattern")
        length = self.num_samples if frames == self.num_frames else None
        return self.tokenizer.decode(codes, length=length)

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern}, codebooks={self.num_codebooks}, vocab={self.special}, "
                f"duration={self.duration} s ({self.num_frames} frames, {self.n_units} steps), "
                f"context={self.clip_seconds} s")

