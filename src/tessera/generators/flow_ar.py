"""FlowAR: scale-wise autoregression over continuous latents with a flow-matching head.

The latent of a continuous autoencoder (any `kl` tokenizer) is area-downsampled to each scale
(1, 2, 4, ... the latent side: each scale doubles the previous one by default). Scale k > 0 is
fed scale k - 1 bicubic-resized to its size; the trunk's output at each position conditions a
small flow-matching head that generates that position's latent vector from noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..config import ConfigError, check_range
from ..nn.resample import bicubic_resize
from .base import load_frozen_tokenizer
from .heads import FlowHead, flow_matching_loss
from .scales import ScaleSequenceConfig, ScaleSequenceGenerator


@dataclass
class FlowARConfig(ScaleSequenceConfig):
    """FlowAR over a `kl` autoencoder; `scales` empty means 1, 2, 4, ... up to the latent side."""

    image_size: int = 32
    scales: list[int] = field(default_factory=list)
    head_width: int = 256
    head_depth: int = 3
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"

    def validate(self) -> None:
        super().validate()
        check_range("head_width", self.head_width, 1)
        check_range("head_depth", self.head_depth, 1)
        if self.scales and (sorted(set(self.scales)) != list(self.scales) or self.scales[0] < 1):
            raise ConfigError(f"scales={list(self.scales)} must be strictly increasing positive sizes")


def doubling_scales(side: int) -> list[int]:
    """1, 2, 4, ... side (side must be a power of two)."""
    if side < 1 or side & (side - 1):
        raise ConfigError(f"the latent side {side} is not a power of two; give `scales` explicitly")
    return [2 ** i for i in range(side.bit_length())]


class FlowARGenerator(ScaleSequenceGenerator):
    """Block-causal trunk over scales + a per-position flow-matching head."""

    kind = "flow_ar"
    config_class = FlowARConfig

    def __init__(self, config: FlowARConfig):
        super().__init__(config)
        from ..tokenizers.continuous import KLAutoencoder
        c = self.config
        self.tokenizer = load_frozen_tokenizer(c.tokenizer, KLAutoencoder, self.kind)
        channels, side, _ = self.tokenizer.latent_shape(c.image_size)
        scales = list(c.scales) or doubling_scales(side)
        if scales[-1] != side:
            raise ConfigError(f"the last scale {scales[-1]} does not match the latent side {side} of the tokenizer "
                              f"at {c.tokenizer} (image_size {c.image_size})")
        self.latent_channels, self.side = channels, side
        self._build_sequence(scales, channels)
        self.head = FlowHead(channels, c.trunk.dim, c.head_width, c.head_depth)

    # ----- sampling protocol -------------------------------------------------------------------------
    def next_input_map(self, state: torch.Tensor, k: int) -> torch.Tensor:
        pn = self.scales[k]
        return bicubic_resize(state, pn)

    def outputs_upto(self, x: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        return self.hidden_upto(x, cond_vec)

    def scale_outputs(self, x: torch.Tensor, k: int, cond_vec: torch.Tensor, cache) -> torch.Tensor:
        return self.scale_hidden(x, k, cond_vec, cache)

    def add_scale(self, state: torch.Tensor | None, units: torch.Tensor, k: int) -> torch.Tensor:
        """The latent map of scale k, (B, C, pn, pn), from its (B, pn^2, C) vectors."""
        pn = self.scales[k]
        return units.transpose(1, 2).reshape(units.shape[0], self.latent_channels, pn, pn)

    def preview(self, state: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(bicubic_resize(state, self.side))

    # ----- training ----------------------------------------------------------------------------------
    def scale_targets(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """The (B, C, pn, pn) target of every scale: the latent area-downsampled."""
        return [latent if pn == self.side else F.interpolate(latent, size=(pn, pn), mode="area")
                for pn in self.scales]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            latent = batch["latents"] if "latents" in batch else self.tokenizer.encode(batch["image"])
        targets = self.scale_targets(latent.float())
        cond_vec = self.training_condition(batch, latent.shape[0], latent.device)
        inputs = [self.next_input_map(targets[k - 1], k) for k in range(1, len(self.scales))]
        hidden = self.hidden_upto(self.teacher_sequence(cond_vec, inputs), cond_vec)
        per_scale = [flow_matching_loss(self.head, target.flatten(2).transpose(1, 2), h,
                                        t_sampling=self.config.t_sampling)[0]
                     for target, h in zip(targets, self.split_by_scale(hidden))]
        return self.combine_scale_losses(per_scale, "flow")

    # ----- output ------------------------------------------------------------------------------------
    def decode_units(self, units: torch.Tensor) -> torch.Tensor:
        """(B, C, side, side) final latent -> images."""
        return self.tokenizer.decode(units)
