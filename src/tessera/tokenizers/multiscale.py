"""VAR's multi-scale residual quantiser over the image VQ (one shared codebook, coarse to fine).

The encoder's latent f (B, D, H, W) is quantised scale by scale: the residual f - f_hat is
area-downsampled to pn x pn, each position takes its nearest code, the code map is
bicubic-upsampled back to H x W, refined by a light 3x3 convolution phi (blended
`(1 - a) * h + a * conv(h)`, one of `phi_count` convolutions shared across scales by relative
depth, as VAR does) and added to the running reconstruction f_hat. The decoder sees f_hat.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import CheckpointError, read_header, resolve_checkpoint
from ..config import ConfigError, check_range
from ..nn.resample import bicubic_matrix, bicubic_resample
from .quantizer import QuantizerOutput, _distributed
from .vq import VQConfig, VQTokenizer


@dataclass
class MultiScaleConfig(VQConfig):
    """A VQ tokenizer whose latent is quantised residually over `scales` (the last = latent side)."""

    scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    l2_norm_codes: bool = False  # residuals are not unit vectors: Euclidean codes, as VAR
    phi_count: int = 4
    phi_blend: float = 0.5
    init_from: str = ""  # a single-scale VQ checkpoint whose weights start this model (fine-tuning)

    def validate(self) -> None:
        super().validate()
        side = self.image_size // self.downsample_factor
        if not self.scales or sorted(self.scales) != list(self.scales) or len(set(self.scales)) != len(self.scales) \
                or self.scales[0] < 1:
            raise ConfigError(f"scales={list(self.scales)} must be strictly increasing positive sizes")
        if self.scales[-1] != side:
            raise ConfigError(f"the last scale {self.scales[-1]} must equal the latent side {side} "
                              f"(image_size {self.image_size} / downsample factor {self.downsample_factor})")
        check_range("phi_count", self.phi_count, 1)
        check_range("phi_blend", self.phi_blend, 0.0, 1.0)


class Phi(nn.Module):
    """VAR's refinement after upsampling: (1 - a) * h + a * conv3x3(h), in h's dtype (f_hat is
    accumulated in float32 whatever the weights' dtype)."""

    def __init__(self, dim: int, blend: float):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.blend = blend

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.blend) + self.conv(h.to(self.conv.weight.dtype)).to(h.dtype).mul(self.blend)


class MultiScaleVQ(VQTokenizer):
    """Images <-> a list of code maps, one per scale (1x1 ... HxW), sharing one codebook."""

    kind = "multiscale_vq"
    config_class = MultiScaleConfig
    presets = {
        "tiny": {**VQTokenizer.presets["tiny"], "scales": [1, 2, 4, 8]},
        "small": {**VQTokenizer.presets["small"], "scales": [1, 2, 3, 4, 6, 8]},
        # VAR's 256px schedule over a 16x16 latent.
        "var16": {**VQTokenizer.presets["vq16"], "code_dim": 32, "codebook_size": 4096,
                  "scales": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]},
    }

    def __init__(self, config: MultiScaleConfig):
        super().__init__(config)
        self.phis = nn.ModuleList(Phi(config.code_dim, config.phi_blend) for _ in range(config.phi_count))
        for pn in set(config.scales) - {self.side}:
            self.register_buffer(f"bicubic_{pn}", bicubic_matrix(pn, self.side), persistent=False)
        if config.init_from:
            self._load_single_scale(config.init_from)

    def _load_single_scale(self, path: str) -> None:
        """Copy encoder, decoder and codebook weights from a single-scale VQ checkpoint."""
        folder = resolve_checkpoint(path)
        header = read_header(folder)
        kind = header["kind"]
        if kind != VQTokenizer.kind:
            raise CheckpointError(f"init_from={path} holds a '{kind}' model; a '{VQTokenizer.kind}' tokenizer is needed")
        state = load_file(str(folder / "model.safetensors"))
        own = self.state_dict()
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise CheckpointError(f"init_from={path} does not fit this tokenizer's layout (e.g. {bad[:3]})")
        if header["config"].get("l2_norm_codes") and not self.config.l2_norm_codes:
            # the source compared unit vectors: keep the same code directions as Euclidean codes
            state["quantizer.embedding.weight"] = F.normalize(state["quantizer.embedding.weight"], dim=1)
        self.load_state_dict(state, strict=False)

    def checkpoint_config(self) -> dict[str, Any]:
        """The saved config: weights are in the checkpoint, so `init_from` is not needed again."""
        return {**super().checkpoint_config(), "init_from": ""}

    # ----- scale geometry ------------------------------------------------------------------------
    @property
    def scales(self) -> list[int]:
        return list(self.config.scales)

    @property
    def side(self) -> int:
        return self.config.scales[-1]

    def phi(self, k: int) -> Phi:
        """The refinement shared by scale k (chosen by relative depth k / (K - 1))."""
        n = len(self.config.scales)
        return self.phis[round(k / max(n - 1, 1) * (len(self.phis) - 1))]

    def upsampled(self, codes_k: torch.Tensor, k: int) -> torch.Tensor:
        """(B, pn, pn) codes of scale k -> their (B, D, H, W) contribution to f_hat."""
        h = self.quantizer.embed(codes_k)
        if h.shape[-1] != self.side:
            h = bicubic_resample(h, getattr(self, f"bicubic_{h.shape[-1]}"))
        return self.phi(k)(h)

    def add_scale(self, f_hat: torch.Tensor | None, codes_k: torch.Tensor, k: int) -> torch.Tensor:
        """f_hat after adding scale k's codes (f_hat None: start from zero)."""
        h = self.upsampled(codes_k, k)
        return h if f_hat is None else f_hat + h

    def next_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """Teacher-forcing input of scale k + 1: f_hat area-downsampled to its size, (B, D, pn, pn)."""
        pn = self.config.scales[k + 1]
        return f_hat if pn == self.side else F.interpolate(f_hat, size=(pn, pn), mode="area")

    def teacher_inputs(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs of scales 1..K-1 from the code maps of scales 0..K-2 (VAR's idxBl_to_var_input)."""
        f_hat, inputs = None, []
        for k in range(len(codes) - 1):
            f_hat = self.add_scale(f_hat, codes[k], k)
            inputs.append(self.next_input(f_hat, k))
        return inputs

    # ----- encode / decode -----------------------------------------------------------------------
    def _residual_pass(self, f: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(f_hat, codes per scale, residual rows compared at each scale) for latents f (B, D, H, W)."""
        f_hat = torch.zeros_like(f)
        codes, rows = [], []
        for k, pn in enumerate(self.config.scales):
            residual = f - f_hat
            if pn != self.side:
                residual = F.interpolate(residual, size=(pn, pn), mode="area")
            flat = self.quantizer.prepare(residual.permute(0, 2, 3, 1).reshape(-1, residual.shape[1]))
            idx = self.quantizer.nearest(flat.detach()).view(f.shape[0], pn, pn)
            codes.append(idx)
            rows.append(flat)
            f_hat = f_hat + self.upsampled(idx, k)
        return f_hat, codes, rows

    @torch.no_grad()
    def encode_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) images in [-1, 1] -> [(B, pn, pn) code ids for each scale]."""
        with torch.autocast(images.device.type, enabled=False):
            return self._residual_pass(self._latents(images).float())[1]

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """All scales flattened coarse to fine: (B, sum pn^2) code ids."""
        return torch.cat([c.flatten(1) for c in self.encode_scales(images)], 1)

    def latent_from_scales(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """f_hat (B, D, H, W) from the code maps of every scale."""
        f_hat = None
        for k, codes_k in enumerate(codes):
            f_hat = self.add_scale(f_hat, codes_k, k)
        return f_hat

    def decode_scales(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """[(B, pn, pn) code ids per scale] -> (B, C, H*f, W*f) images clamped to [-1, 1]."""
        return self.decode_latent(self.latent_from_scales(codes))

    def split_scales(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(B, sum pn^2) -> [(B, pn, pn)] per scale."""
        sizes = [pn * pn for pn in self.config.scales]
        return [c.view(-1, pn, pn) for c, pn in zip(flat.split(sizes, 1), self.config.scales)]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.decode_scales(self.split_scales(codes))

    # ----- training ------------------------------------------------------------------------------
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Straight-through reconstruction from f_hat; training mode also tracks code usage over all
        scales and restarts dead codes from residuals of the batch."""
        f = self._latents(images)
        with torch.autocast(images.device.type, enabled=False):
            f = f.float()
            f_hat, codes, rows = self._residual_pass(f)
            counts = torch.bincount(torch.cat([c.flatten() for c in codes]),
                                    minlength=self.quantizer.codebook_size).float()
            restarts = f.new_zeros(())
            if self.training:
                if _distributed():
                    torch.distributed.all_reduce(counts)
                self.quantizer.update_usage(counts)
                restarts = self.quantizer.restart_dead(torch.cat(rows).detach())
            probs = counts / counts.sum().clamp_min(1)
            perplexity = torch.exp(-(probs * probs.clamp_min(1e-10).log()).sum())
            out = QuantizerOutput(
                z_q=f + (f_hat - f).detach(), indices=codes[-1], codebook_loss=F.mse_loss(f_hat, f.detach()),
                commit_loss=F.mse_loss(f, f_hat.detach()), usage=(counts > 0).float().mean(),
                perplexity=perplexity, restarts=restarts)
        return self._decode_raw(out.z_q), out
