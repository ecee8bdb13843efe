"""Next-scale generation (VAR) over a multi-scale residual VQ.

Scale k > 0 is fed the running reconstruction f_hat of the code maps of scales < k,
area-downsampled to scale k's size (VAR's teacher forcing); every token of scale k is then
classified over the shared codebook at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..nn.fused_cross_entropy import weighted_linear_cross_entropy
from .base import load_frozen_tokenizer
from .heads import FusedLossConfig, TokenHead
from .scales import ScaleSequenceConfig, ScaleSequenceGenerator


@dataclass
class NextScaleConfig(ScaleSequenceConfig, FusedLossConfig):
    """VAR over a `multiscale_vq` tokenizer (its scale schedule is the sequence layout)."""


class NextScaleGenerator(ScaleSequenceGenerator):
    """Block-causal transformer predicting all tokens of scale k from scales < k."""

    kind = "next_scale"
    config_class = NextScaleConfig

    def __init__(self, config: NextScaleConfig):
        super().__init__(config)
        from ..tokenizers.multiscale import MultiScaleVQ
        self.tokenizer = load_frozen_tokenizer(self.config.tokenizer, MultiScaleVQ, self.kind)
        self.vocab_size = self.tokenizer.vocab_size
        self._build_sequence(self.tokenizer.scales, self.tokenizer.config.code_dim)
        self.head = TokenHead(self.config.trunk.dim, self.vocab_size)

    # ----- sampling protocol -------------------------------------------------------------------------
    def next_input_map(self, state: torch.Tensor, k: int) -> torch.Tensor:
        return self.tokenizer.next_input(state, k - 1)

    def outputs_upto(self, x: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_upto(x, cond_vec))

    def scale_outputs(self, x: torch.Tensor, k: int, cond_vec: torch.Tensor, cache) -> torch.Tensor:
        return self.head(self.scale_hidden(x, k, cond_vec, cache))

    def add_scale(self, state: torch.Tensor | None, units: torch.Tensor, k: int) -> torch.Tensor:
        pn = self.scales[k]
        return self.tokenizer.add_scale(state, units.view(-1, pn, pn), k)

    def preview(self, state: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_latent(state)

    # ----- training ----------------------------------------------------------------------------------
    def batch_codes(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Ground-truth code maps per scale, from `tokens` (B, L) or encoded from `image`."""
        if "tokens" in batch:
            return self.tokenizer.split_scales(batch["tokens"])
        return self.tokenizer.encode_scales(batch["image"])

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = self.batch_codes(batch)
        cond_vec = self.training_condition(batch, codes[0].shape[0], codes[0].device)
        hidden = self.hidden_upto(self.teacher_sequence(cond_vec, self.tokenizer.teacher_inputs(codes)), cond_vec)
        targets = torch.cat([c.flatten(1) for c in codes], 1)
        if self.config.loss_chunk:
            return self._fused_loss(hidden, targets)
        logits = self.head(hidden)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none",
                                    label_smoothing=self.config.label_smoothing)
        loss, logs = self.combine_scale_losses([part.mean() for part in self.split_by_scale(per_token)], "ce")
        logs["acc"] = (logits.argmax(-1) == targets).float().mean().detach()
        return loss, logs

    def _fused_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same loss and logs through the fused linear cross-entropy, `loss_chunk` tokens at a time."""
        b = targets.shape[0]
        loss, per_token, _, correct = weighted_linear_cross_entropy(
            hidden.flatten(0, 1), self.head.proj.weight, targets.flatten(), self.token_loss_weights(b, hidden.device),
            self.config.label_smoothing, 0.0, self.config.loss_chunk, self.config.loss_kernel)
        _, logs = self.combine_scale_losses([part.mean() for part in self.split_by_scale(per_token.view(b, -1))], "ce")
        logs["acc"] = correct.float() / targets.numel()
        return loss, logs

    # ----- output ------------------------------------------------------------------------------------
    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        """(B, L) codes of every scale -> images."""
        return self.tokenizer.decode(units)
