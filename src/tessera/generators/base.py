"""The Generator protocol shared by every paradigm.

The trainer sees only `loss(batch) -> (loss, logs)`. Samplers see only the one-step methods
declared here (`prefill`, `decode_step`, `logits_all`) and the model's KV cache; they never
see training code, and generators never import sampler internals.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..modeling import TesseraModel
from ..nn.cache import KVCache
from .conditioning import condition_size

Condition = Any  # LongTensor of class ids, list of prompt strings, or an int batch size (unconditional)


class Sampler(Protocol):
    """Anything that turns (generator, condition) into the generator's units."""

    def __call__(self, model: "Generator", cond: Condition) -> torch.Tensor: ...


# Batch keys that hold the samples themselves; with cond=none their count is the condition.
_SAMPLE_KEYS = ("tokens", "codes", "image", "audio")


class Generator(TesseraModel):
    """A trainable model that can also sample: `sample(cond, sampler)` returns images or audio.

    Every generator holds its condition module as `self.prefix` (`ConditionedConfig.make_prefix`);
    the condition helpers below work through it.
    """

    def sample(self, cond: Condition, sampler: Sampler) -> torch.Tensor:
        """Run `sampler` and decode its units to the output signal (images in [-1, 1])."""
        return self.decode_units(sampler(self, cond))

    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parse_condition(self, values: list[str] | None, n: int) -> Condition:
        """Turn user strings (prompts or class names/indices) into a batch condition of size n."""
        return self.prefix.parse(values, n)

    def prefix_embeddings(self, cond: Condition, drop: torch.Tensor) -> torch.Tensor:
        """(B, P, dim) condition tokens; rows where `drop` is True get the null condition."""
        if isinstance(cond, torch.Tensor):
            cond = cond.to(drop.device)
        return self.prefix(cond, drop)

    def batch_condition(self, batch: dict[str, Any]) -> Condition:
        """The condition of a training batch, by `config.cond`: class ids, captions or the batch size."""
        if self.config.cond == "class":
            return batch["class"]
        if self.config.cond == "text":
            return batch["text"]
        return condition_size(next(batch[key] for key in _SAMPLE_KEYS if key in batch))

    def condition_dropout(self, b: int, device: torch.device | str) -> torch.Tensor:
        """(b,) rows whose condition becomes null: probability `cond_drop` in training (for CFG), none in eval."""
        if not self.training:
            return torch.zeros(b, dtype=torch.bool, device=device)
        return torch.rand(b, device=device) < self.config.cond_drop


class AutoregressiveGenerator(Generator):
    """A generator producing `n_units` units of `unit_size` tokens each, left to right.

    Sequence layout: [prefix (condition) tokens][units 0..n-2]; the output at the last prefix
    slot predicts unit 0 and the output at unit j predicts unit j+1.
    """

    n_units: int
    unit_size: int
    has_condition: bool

    @property
    def prefix_length(self) -> int:
        return self.prefix.length

    def new_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """A static cache for the prefix and units 0..n-2 (the last unit is never fed back)."""
        return self.trunk.new_cache(batch_size, self.prefix_length + self.n_units - 1, dtype, device)

    def logits_all(self, prefix: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Uncached: given n units, logits (B, n+1, unit_size, V) for units 0..n."""
        raise NotImplementedError

    def prefill(self, prefix: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Write the prefix into the cache; logits (B, unit_size, V) of unit 0."""
        raise NotImplementedError

    def decode_step(self, unit: torch.Tensor, index: int | torch.Tensor, cache: KVCache,
                    kv_len: int | None = None) -> torch.Tensor:
        """Feed unit `index` (B, unit_size); logits (B, unit_size, V) of unit index+1.

        `kv_len` (static) limits attention to the first cache slots; it must cover every
        slot written so far.
        """
        raise NotImplementedError



class ScaleWiseGenerator(Generator):
    """A generator producing one map per scale, coarse to fine (VAR's tokens, FlowAR's latents).

    Sequence layout: scale k occupies slots [starts[k], starts[k] + sizes[k]). A sampler keeps a
    `state` (what scales so far have built: f_hat, or the last latent map), asks for the inputs
    of the next scale, runs the trunk one scale at a time and feeds the new units back.
    """

    scales: list[int]
    sizes: list[int]
    has_condition: bool

    def condition_vector(self, cond: Condition, drop: torch.Tensor) -> torch.Tensor:
        """(B, dim) pooled condition; rows where `drop` is True get the null condition."""
        raise NotImplementedError

    def scale_tokens(self, cond_vec: torch.Tensor, state: torch.Tensor | None, k: int) -> torch.Tensor:
        """(B', pn_k^2, dim) inputs of scale k (state rows repeated to the condition's batch B')."""
        raise NotImplementedError

    def new_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        raise NotImplementedError

    def outputs_upto(self, x: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        """Uncached: inputs of scales 0..k concatenated -> per-position outputs for all of them."""
        raise NotImplementedError

    def scale_outputs(self, x: torch.Tensor, k: int, cond_vec: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached: per-position outputs (B', pn_k^2, ...) of scale k (logits, or head conditions)."""
        raise NotImplementedError

    def add_scale(self, state: torch.Tensor | None, units: torch.Tensor, k: int) -> torch.Tensor:
        """The state after scale k's units (B, pn_k^2, ...) (state None before scale 0)."""
        raise NotImplementedError

    def preview(self, state: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) of the current state: the coarse-to-fine picture."""
        raise NotImplementedError


def load_frozen_tokenizer(path: str, tokenizer_class: type[TesseraModel], owner_kind: str) -> TesseraModel:
    """Load the tokenizer a generator is built on, frozen and in eval mode; a tokenizer of another
    kind gives one line naming both."""
    from ..checkpoint import CheckpointError, read_header, resolve_checkpoint
    kind = read_header(resolve_checkpoint(path))["kind"]
    if kind != tokenizer_class.kind:
        raise CheckpointError(f"a {owner_kind} generator needs a '{tokenizer_class.kind}' tokenizer, "
                              f"but {path} holds a '{kind}' model")
    return tokenizer_class.from_pretrained(path).requires_grad_(False).eval()
