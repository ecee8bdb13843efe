"""Continuous latents for flow-matching generators: a KL autoencoder (diffusers' AutoencoderKL),
built from a config and trained here by the project's trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, check_range
from ..metrics import psnr
from ..modeling import TesseraModel


@dataclass
class KLConfig(Config):
    """AutoencoderKL layout; downsample factor = 2**(len(block_out_channels) - 1)."""

    image_size: int = 32
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    kl_weight: float = 1e-6
    scaling_factor: float = 1.0  # latents are multiplied by it after encoding (LDM: 1 / std of the latents)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            check_range(name, getattr(self, name), 1)
        check_range("kl_weight", self.kl_weight, 0.0)
        check_range("scaling_factor", self.scaling_factor, 0.0, low_open=True)
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"block_out_channels={list(self.block_out_channels)} must be non-empty and divisible by "
                              f"norm_num_groups={self.norm_num_groups}")
        if self.image_size % self.downsample_factor:
            raise ConfigError(f"image_size={self.image_size} is not divisible by the downsample factor "
                              f"{self.downsample_factor}")


class KLAutoencoder(TesseraModel):
    """Images in [-1, 1] <-> (B, latent_channels, H/f, W/f) latents, trained with L1 + KL."""

    kind = "kl"
    config_class = KLConfig
    presets = {
        # CPU seconds: 32x32 -> 16x16 x 4.
        "tiny": {"image_size": 32, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8},
        # One GPU, minutes: 64x64 -> 8x8 x 4.
        "small": {"image_size": 64, "block_out_channels": [64, 128, 128, 256], "layers_per_block": 1,
                  "norm_num_groups": 32},
    }

    def __init__(self, config: KLConfig):
        super().__init__(config)
        from diffusers import AutoencoderKL
        n = len(config.block_out_channels)
        self.vae = AutoencoderKL(
            in_channels=config.in_channels, out_channels=config.in_channels, latent_channels=config.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups, sample_size=config.image_size)

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of square images of `image_size` (default: the config's)."""
        size = self.config.image_size if image_size is None else image_size
        f = self.config.downsample_factor
        if size % f:
            raise ConfigError(f"image_size={size} is not divisible by the downsample factor {f}")
        return self.config.latent_channels, size // f, size // f

    def _posterior(self, images: torch.Tensor):
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Scaled latents: the posterior mean (or a sample) times `scaling_factor`."""
        posterior = self._posterior(images)
        z = posterior.sample() if sample else posterior.mean
        return z * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images clamped to [-1, 1]."""
        z = latents.to(self.vae.dtype) / self.config.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1 reconstruction of a posterior sample + kl_weight * KL to N(0, I) (per-element mean)."""
        images = batch["image"]
        posterior = self._posterior(images)
        recon = self.vae.decode(posterior.sample()).sample
        rec_loss = F.l1_loss(recon.float(), images.float())
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return rec_loss + self.config.kl_weight * kl, {"rec_loss": rec_loss.detach(), "kl": kl.detach(),
                                                       "psnr": psnr(recon.detach(), images)}


def estimate_scaling_factor(latents: torch.Tensor) -> float:
    """The LDM convention for `scaling_factor`: 1 / std of unscaled latents of the training data."""
    return float(1.0 / latents.float().std().clamp_min(1e-8))
