"""The training loop the model tests share: a few optimiser steps on one fixed batch."""
from __future__ import annotations

from typing import Any

import torch


def fit(model: torch.nn.Module, batch: dict[str, Any], steps: int, lr: float,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW) -> tuple[list[float], dict[str, Any]]:
    """`steps` steps of `optimizer` on the model's trainable parameters and its loss on `batch`;
    returns every step's loss and the last step's logs."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    logs: dict[str, Any] = {}
    for _ in range(steps):
        loss, logs = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, logs
