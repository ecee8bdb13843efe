"""Residual vector quantiser (SoundStream / EnCodec RVQ): K `Quantizer` stages on successive residuals.

Stage k quantises what stages 0..k-1 left over, so any prefix of the K code streams decodes to a
coarser latent. Codes are Euclidean (residuals are not unit vectors). With quantiser dropout each
training example keeps a random number of stages (SoundStream), so one model serves every prefix;
all stages still run on every step, so every codebook gets a gradient and distributed replicas
make the same collective calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quantizer import Quantizer


@dataclass
class ResidualVQOutput:
    """One residual pass; losses are sums over stages, statistics detached."""

    z_q: torch.Tensor  # (B, D, T) straight-through quantised latents (each example's kept stages)
    codes: torch.Tensor  # (B, K, T) code ids of every stage
    codebook_loss: torch.Tensor  # sum over stages of ||sg(r_k) - e_k||^2
    commit_loss: torch.Tensor  # sum over stages of ||r_k - sg(e_k)||^2
    usage: torch.Tensor  # (K,) fraction of each stage's codes used in this batch
    perplexity: torch.Tensor  # (K,) code perplexity per stage
    restarts: torch.Tensor  # dead codes re-initialised in this pass, all stages
    kept: torch.Tensor  # (B,) number of stages each example's z_q sums


class ResidualVQ(nn.Module):
    """`num_codebooks` Euclidean `Quantizer`s of `codebook_size` x `code_dim`, applied to residuals."""

    def __init__(self, num_codebooks: int = 4, codebook_size: int = 1024, code_dim: int = 128,
                 usage_decay: float = 0.99, dead_threshold: float = 0.0, quantizer_dropout: float = 0.0):
        super().__init__()
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks={num_codebooks} must be at least 1")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout={quantizer_dropout} must lie in [0, 1]")
        self.quantizer_dropout = quantizer_dropout
        self.stages = nn.ModuleList(
            Quantizer(codebook_size, code_dim, l2_norm=False, usage_decay=usage_decay, dead_threshold=dead_threshold)
            for _ in range(num_codebooks))

    @property
    def num_codebooks(self) -> int:
        return len(self.stages)

    def _check_stages(self, n: int | None) -> int:
        n = self.num_codebooks if n is None else n
        if not 1 <= n <= self.num_codebooks:
            raise ValueError(f"num_codebooks={n} must lie in [1, {self.num_codebooks}]")
        return n

    def encode(self, z: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """(B, D, T) latents -> (B, n, T) code ids of the first n stages; never changes any state."""
        n = self._check_stages(num_codebooks)
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            residual = z.float()
            codes = []
            for stage in self.stages[:n]:
                idx = stage.lookup(residual[:, :, None])
                residual = residual - stage.embed(idx)[:, :, 0]
                codes.append(idx[:, 0])
            return torch.stack(codes, 1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K', T) code ids of the first K' <= K stages -> (B, D, T) summed code vectors."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes must be (B, K', T) with 1 <= K' <= {self.num_codebooks} streams, "
                             f"got shape {tuple(codes.shape)}")
        return sum(stage.embed(codes[:, k, None])[:, :, 0] for k, stage in enumerate(self.stages[:codes.shape[1]]))

    def _kept_stages(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) stages kept per example: all, or with probability `quantizer_dropout` uniform in 1..K."""
        k = self.num_codebooks
        kept = torch.full((batch,), k, device=device)
        if self.training and self.quantizer_dropout > 0:
            drop = torch.rand(batch, device=device) < self.quantizer_dropout
            kept = torch.where(drop, torch.randint(1, k + 1, (batch,), device=device), kept)
        return kept

    def forward(self, z: torch.Tensor) -> ResidualVQOutput:
        """Quantise (B, D, T) latents through every stage; training mode restarts dead codes per stage and
        applies quantiser dropout. The output is straight-through: z + sg(sum of kept codes - z)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            kept = self._kept_stages(z.shape[0], z.device)
            residual, quantised = z, torch.zeros_like(z)
            codes, usage, perplexity = [], [], []
            codebook_loss = commit_loss = restarts = z.new_zeros(())
            for k, stage in enumerate(self.stages):
                out = stage(residual[:, :, None])
                q = out.z_q.detach()[:, :, 0]  # the code vectors (forward value of the straight-through)
                quantised = quantised + q * (kept > k).to(q.dtype)[:, None, None]
                residual = residual - q
                codes.append(out.indices[:, 0])
                codebook_loss = codebook_loss + out.codebook_loss
                commit_loss = commit_loss + out.commit_loss
                restarts = restarts + out.restarts
                usage.append(out.usage)
                perplexity.append(out.perplexity)
            return ResidualVQOutput(
                z_q=z + (quantised - z).detach(), codes=torch.stack(codes, 1), codebook_loss=codebook_loss,
                commit_loss=commit_loss, usage=torch.stack(usage), perplexity=torch.stack(perplexity),
                restarts=restarts, kept=kept)

    def alive_fraction(self) -> list[float]:
        """Per stage, the fraction of codes whose usage EMA is above the dead-code threshold."""
        return [stage.alive_fraction() for stage in self.stages]
