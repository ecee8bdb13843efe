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

Condition = Any  # LongTensor of class ids, list of prompt strings, or an int batch size (unconditional)


class Sampler(Protocol):
    """Anything that turns (generator, condition) into the generator's units."""

    def __call__(self, model: "Generator", cond: Condition) -> torch.Tensor: ...


class Generator(TesseraModel):
    """A trainable model that can also sample: `sample(cond, sampler)` returns images."""

    def sample(self, cond: Condition, sampler: Sampler) -> torch.Tensor:
        """Run `sampler` and decode its units to the output signal (images in [-1, 1])."""
        return self.decode_units(sampler(self, cond))

    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parse_condition(self, values: list[str] | None, n: int) -> Condition:
        """Turn user strings (prompts or class names/indices) into a batch condition of size n."""
        raise NotImplementedError


class AutoregressiveGenerator(Generator):
    """A generator producing `n_units` units of `unit_size` tokens each, left to right.

    Sequence layout: [prefix (condition) tokens][units 0..n-2]; the output at the last prefix
    slot predicts unit 0 and the output at unit j predicts unit j+1.
    """

    n_units: int
    unit_size: int
    has_condition: bool

    def prefix_embeddings(self, cond: Condition, drop: torch.Tensor) -> torch.Tensor:
        """(B, P, dim) condition tokens; rows where `drop` is True get the null condition."""
        raise NotImplementedError

    def new_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        raise NotImplementedError

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

