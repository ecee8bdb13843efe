"""Output heads and their losses, shared by generators."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenHead(nn.Module):
    """Linear classifier from trunk features to codebook logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE over all positions (+ z-loss on log Z), computed in float32; also accuracy."""
    flat = logits.float().flatten(0, -2)
    target = targets.flatten()
    ce = F.cross_entropy(flat, target, label_smoothing=label_smoothing)
    loss = ce
    logs = {"ce": ce.detach(), "acc": (flat.argmax(-1) == target).float().mean().detach()}
    if z_loss > 0:
        zl = torch.logsumexp(flat, dim=-1).pow(2).mean()
        loss = loss + z_loss * zl
        logs["z_loss"] = zl.detach()
    return loss, logs
