"""Exponential moving average of the trainable weights, kept in float32."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..modeling import TesseraModel


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights`, with warm-up `min(decay, (1+n)/(10+n))`,
    applied with foreach ops to all averaged tensors at once."""

    def __init__(self, model: TesseraModel, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.trainable_state_dict().items()}
        self._updates = torch.zeros((), dtype=torch.float64)  # a tensor, so a skipped step needs no host sync

    @property
    def updates(self) -> int:
        """Updates averaged in so far (skipped steps not counted)."""
        return int(self._updates)

    @torch.no_grad()
    def update(self, model: TesseraModel, live: dict[str, torch.Tensor] | None = None,
               finite: torch.Tensor | None = None) -> None:
        """Average in `live`, the model's trainable state by default (under ZeRO-3: this rank's shards,
        matching a shadow cut to the same shards). `finite` (0-d bool): when False the averaged
        weights stay as they are and the update is not counted, decided on the device."""
        values = model.trainable_state_dict() if live is None else live
        device = next(iter(self.shadow.values())).device
        self._updates = self._updates.to(device)
        keep = torch.ones((), dtype=torch.float64, device=device) if finite is None else finite.to(device, torch.float64)
        self._updates += keep
        decay = torch.clamp((1 + self._updates) / (10 + self._updates), max=self.decay)
        averaged = [k for k, v in values.items() if v.dtype.is_floating_point and not k.startswith(model.ema_follows_live)]
        shadows = [self.shadow[k] for k in averaged]
        # lerp towards the values by w, a 0-d tensor on the device (0 on a skipped step): a Python
        # float weight would be read back to the host, a sync that left the GPU idle while the host
        # queued the next step. One pass per tensor (read shadow and value, write shadow), where
        # multiply-then-add made three and a temporary copy of the weights.
        weight = ((1 - decay) * keep).float()
        torch._foreach_lerp_(shadows, [values[k].float() for k in averaged], [weight] * len(shadows))
        for key in values.keys() - set(averaged):
            self.shadow[key].copy_(values[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)
        self._updates = torch.full((), float(updates), dtype=torch.float64)

    @contextlib.contextmanager
    def applied_to(self, model: TesseraModel) -> Iterator[None]:
        """Temporarily load the EMA weights into `model` (for previews)."""
        backup = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in self.shadow.items()}, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(backup, strict=False)
