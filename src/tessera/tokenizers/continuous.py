"""Continuous latents for flow-matching generators: a KL autoencoder (diffusers' `AutoencoderKL`,
built from a config, never downloaded) trained here by the project's trainer through `loss(batch)`.

Latents are scaled by `scaling_factor` on the way out of `encode` and unscaled on the way into
`decode`. The LDM convention sets it after training to 1 / std of the unscaled latents of the
training data, so that generators see unit-variance latents:

    model.set_scaling_factor(1.0)  # encode() now returns unscaled latents
    model.set_scaling_factor(estimate_scaling_factor(model.encode(images)))
    model.save_pretrained(path)    # config.json records the factor
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..config import Config, ConfigError, check_range
from ..metrics import psnr
from ..modeling import TesseraModel


@dataclass
class KLConfig(Config):
    """AutoencoderKL layout and loss; downsample factor = 2**(len(block_out_channels) - 1)."""

    image_size: int = 32
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    norm_num_groups: int = 8  # GroupNorm groups; must divide every block width
    mid_block_attention: bool = True  # self-attention in the encoder's and decoder's middle blocks
    rec_loss: Literal["l1", "mse"] = "l1"
    # Weight of the per-image KL sum against the per-image reconstruction sum (LDM's balance, so the
    # usual 1e-6 means the same here although the logged rec_loss is a per-element mean).
    kl_weight: float = 1e-6
    scaling_factor: float = 1.0  # encode() multiplies latents by it, decode() divides (LDM: 1 / std)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            check_range(name, getattr(self, name), 1)
        check_range("kl_weight", self.kl_weight, 0.0)
        check_range("scaling_factor", self.scaling_factor, 0.0, low_open=True)
        widths = list(self.block_out_channels)
        if not widths or min(widths) < 1:
            raise ConfigError(f"block_out_channels={widths} must be a non-empty list of positive ints")
        if any(w % self.norm_num_groups for w in widths):
            raise ConfigError(f"norm_num_groups={self.norm_num_groups} must divide every width in "
                              f"block_out_channels={widths}")
        if self.image_size % self.downsample_factor:
            raise ConfigError(f"image_size={self.image_size} is not divisible by the downsample factor "
                              f"{self.downsample_factor} (2**(len(block_out_channels)-1) with "
                              f"block_out_channels={widths})")


class KLAutoencoder(TesseraModel):
    """Images in [-1, 1] <-> (B, latent_channels, H/f, W/f) continuous latents; trained with
    L1 (or MSE) reconstruction of a posterior sample + kl_weight * KL to N(0, I)."""

    kind = "kl"
    config_class = KLConfig
    presets = {
        # CPU, a fraction of a second per step: 32x32 -> 4x16x16, 0.17M params.
        "tiny": {"image_size": 32, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8},
        # One GPU, minutes: 64x64 -> 4x8x8, 3.9M params.
        "small": {"image_size": 64, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1,
                  "norm_num_groups": 32},
    }

    def __init__(self, config: KLConfig):
        super().__init__(config)
        n = len(config.block_out_channels)
        self.vae = AutoencoderKL(
            in_channels=config.in_channels, out_channels=config.in_channels, latent_channels=config.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups, sample_size=config.image_size,
            mid_block_add_attention=config.mid_block_attention)

    # ----- shapes ----------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of square images of `image_size` (default: the config's)."""
        size = self.config.image_size if image_size is None else image_size
        f = self.downsample_factor
        if size % f:
            raise ConfigError(f"image_size={size} is not divisible by the downsample factor {f}")
        return self.config.latent_channels, size // f, size // f

    # ----- inference API ---------------------------------------------------------------------
    def posterior(self, images: torch.Tensor) -> DiagonalGaussianDistribution:
        """The diagonal Gaussian q(z | images) of unscaled latents."""
        f, c = self.downsample_factor, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c or images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"expected (B, {c}, H, W) images with H, W divisible by {f}, got {tuple(images.shape)}")
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, latent_channels, H/f, W/f) latents: the posterior
        mean (or a sample when `sample`) times `scaling_factor`."""
        posterior = self.posterior(images)
        z = posterior.sample(generator) if sample else posterior.mean
        return z * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled (B, latent_channels, h, w) latents -> (B, C, h*f, w*f) images clamped to [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected (B, {self.config.latent_channels}, h, w) latents, got {tuple(latents.shape)}")
        z = latents.to(self.vae.dtype) / self.config.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

    def set_scaling_factor(self, factor: float) -> None:
        """Replace the config's `scaling_factor` (validated); saved with the next `save_pretrained`."""
        self.config = self.config.replace(scaling_factor=factor)

    # ----- training --------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction of a posterior sample of `batch["image"]` + kl_weight * KL.

        `rec_loss` is the per-element mean; `kl` is the per-image KL sum (nats), weighted by
        kl_weight / (C * H * W) so the balance is LDM's (both terms summed per image).
        """
        images = batch["image"]
        posterior = self.posterior(images)
        recon = self.vae.decode(posterior.sample()).sample.float()
        target = images.float()
        rec_loss = F.l1_loss(recon, target) if self.config.rec_loss == "l1" else F.mse_loss(recon, target)
        mean, logvar = posterior.mean.float(), posterior.logvar.float()  # float32 even under bf16 autocast
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        total = rec_loss + self.config.kl_weight * kl / images[0].numel()
        return total, {"rec_loss": rec_loss.detach(), "kl": kl.detach(), "psnr": psnr(recon, target)}


def estimate_scaling_factor(latents: torch.Tensor) -> float:
    """LDM's `scaling_factor`: 1 / std of *unscaled* latents (encoded with scaling_factor=1) of a
    batch of training images, so scaled latents have unit variance."""
    std = float(latents.float().std())
    if not std > 0:
        raise ValueError(f"latents have std {std}; cannot estimate a scaling factor")
    return 1.0 / std
