"""Exponential moving average of the trainable weights, kept in float32."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..modeling import TesseraModel


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights`, with warm-up `min(decay, (1+n)/(10+n))`."""

    def __init__(self, model: TesseraModel, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.trainable_state_dict().items()}

    @torch.no_grad()
    def update(self, model: TesseraModel, live: dict[str, torch.Tensor] | None = None) -> None:
        """Average in `live`, the model's trainable state by default (under ZeRO-3: this rank's shards,
        matching a shadow cut to the same shards)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in (model.trainable_state_dict() if live is None else live).items():
            if value.dtype.is_floating_point and not key.startswith(model.ema_follows_live):
                self.shadow[key].lerp_(value.float(), 1 - decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)
        self.updates = updates

    @contextlib.contextmanager
    def applied_to(self, model: TesseraModel) -> Iterator[None]:
        """Temporarily load the EMA weights into `model` (for previews)."""
        backup = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in self.shadow.items()}, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(backup, strict=False)
