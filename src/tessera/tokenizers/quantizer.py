"""Low-dimensional codebook quantiser (LlamaGen / ViT-VQGAN style) with usage tracking and dead-code restart."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Rows of the (tokens x codes) similarity matrix computed at once in `nearest`.
_MAX_SIM_ELEMENTS = 1 << 26


@dataclass
class QuantizerOutput:
    """What one quantiser pass produces; statistics are detached 0-d tensors."""

    z_q: torch.Tensor  # (B, D, h, w) straight-through quantised latents
    indices: torch.Tensor  # (B, h, w) code ids
    codebook_loss: torch.Tensor  # ||sg(z) - e||^2: moves codes towards encoder outputs
    commit_loss: torch.Tensor  # ||z - sg(e)||^2: keeps the encoder close to its codes
    usage: torch.Tensor  # fraction of codes used in this (global) batch
    perplexity: torch.Tensor  # exp(entropy) of the batch's code distribution
    restarts: torch.Tensor  # number of dead codes re-initialised in this pass


class Quantizer(nn.Module):
    """Nearest-code lookup in a (codebook_size, code_dim) table.

    With `l2_norm`, latents and codes are both unit-normalised and nearness is cosine similarity;
    otherwise it is Euclidean distance. The buffer `usage` holds an EMA of each code's share of
    assignments relative to uniform (1.0 = used exactly as often as a uniform codebook would).
    In training mode, codes whose usage falls below `dead_threshold` are re-initialised from
    random latents of the current batch before the lookup. Under torch.distributed the counts
    are summed over ranks and the replacement latents come from rank 0, so replicas stay equal.
    """

    def __init__(self, codebook_size: int, code_dim: int, l2_norm: bool = True,
                 usage_decay: float = 0.99, dead_threshold: float = 0.0):
        super().__init__()
        self.codebook_size, self.code_dim, self.l2_norm = codebook_size, code_dim, l2_norm
        self.usage_decay, self.dead_threshold = usage_decay, dead_threshold
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.normal_(self.embedding.weight, std=1.0 / code_dim ** 0.5)
        self.register_buffer("usage", torch.ones(codebook_size))

    def codebook(self) -> torch.Tensor:
        """The (K, D) code vectors used for lookup (unit-normalised when `l2_norm`). Read through the
        embedding's forward: DeepSpeed ZeRO-3 shards parameters and gathers them around their own
        module's forward and backward only."""
        weight = self.embedding(torch.arange(self.codebook_size, device=self.usage.device)).float()
        return F.normalize(weight, dim=1) if self.l2_norm else weight

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as compared with codes: float32, unit-normalised over dim 1 when `l2_norm`."""
        z = z.float()
        return F.normalize(z, dim=1) if self.l2_norm else z

    @torch.no_grad()
    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, D) prepared latents -> (N,) ids of the nearest codes (cosine or Euclidean)."""
        codes = self.codebook()
        bias = None if self.l2_norm else -0.5 * codes.pow(2).sum(1)  # argmax z.e - |e|^2/2 = argmin |z-e|^2
        step = max(1, _MAX_SIM_ELEMENTS // self.codebook_size)
        out = []
        for chunk in z_flat.split(step):
            sim = chunk @ codes.t()
            out.append((sim if bias is None else sim + bias).argmax(1))
        return torch.cat(out) if out else z_flat.new_zeros(0, dtype=torch.long)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) raw latents -> (B, h, w) code ids; never changes any state."""
        with torch.autocast(z.device.type, enabled=False):
            z = self.prepare(z)
            b, d, h, w = z.shape
            return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, D, h, w) code vectors."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise (B, D, h, w) latents with a straight-through estimator. Training mode also restarts
        dead codes (before the lookup) and updates the usage EMA from counts summed over all ranks."""
        with torch.autocast(z.device.type, enabled=False):
            z = self.prepare(z)
            b, d, h, w = z.shape
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            restarts = self.restart_dead(z_flat.detach()) if self.training else z.new_zeros(())
            indices = self.nearest(z_flat.detach())
            z_q = self.embed(indices.view(b, h, w))
            codebook_loss = F.mse_loss(z_q, z.detach())
            commit_loss = F.mse_loss(z, z_q.detach())
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            if self.training:
                if _distributed():
                    dist.all_reduce(counts)
                self.update_usage(counts)
            probs = counts / counts.sum().clamp_min(1)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            return QuantizerOutput(
                z_q=z + (z_q - z).detach(), indices=indices.view(b, h, w), codebook_loss=codebook_loss,
                commit_loss=commit_loss, usage=(counts > 0).float().mean(), perplexity=perplexity,
                restarts=restarts)

    @torch.no_grad()
    def update_usage(self, counts: torch.Tensor) -> None:
        share = counts * (self.codebook_size / counts.sum().clamp_min(1))
        self.usage.mul_(self.usage_decay).add_(share, alpha=1 - self.usage_decay)

    @torch.no_grad()
    def restart_dead(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Re-initialise codes with usage below the threshold from random rows of `z_flat`."""
        if self.dead_threshold <= 0:
            return z_flat.new_zeros(())
        dead = (self.usage < self.dead_threshold).nonzero().squeeze(1)
        n = dead.numel()
        if n == 0:
            return z_flat.new_zeros(())
        pool = z_flat.shape[0]
        picks = torch.randperm(pool, device=z_flat.device)[:n] if n <= pool else \
            torch.randint(pool, (n,), device=z_flat.device)
        fresh = z_flat[picks].to(self.embedding.weight.dtype).contiguous()
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.embedding.weight[dead] = fresh
        self.usage[dead] = 1.0
        return z_flat.new_tensor(float(n))

    def alive_fraction(self) -> float:
        """Fraction of codes whose usage EMA is above the dead-code threshold (above 0 if it is 0)."""
        return float((self.usage > self.dead_threshold).float().mean())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
