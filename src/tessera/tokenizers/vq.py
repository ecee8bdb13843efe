"""Image VQ tokenizer: conv encoder -> l2-normalised low-dim codebook -> conv decoder (+ optional PatchGAN)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..config import Config, ConfigError, check_range
from ..metrics import psnr
from ..modeling import TesseraModel
from .quantizer import Quantizer, QuantizerOutput
from .vq_modules import Decoder, Encoder, PatchDiscriminator


@dataclass
class VQConfig(Config):
    """Image VQ tokenizer (LlamaGen-style). Downsample factor = 2**(len(channel_mult) - 1)."""

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    z_channels: int = 32
    norm_groups: int = 8  # GroupNorm groups in encoder/decoder; must divide every width
    codebook_size: int = 256
    code_dim: int = 8
    l2_norm_codes: bool = True
    commitment_beta: float = 0.25
    codebook_loss_weight: float = 1.0
    # A code's usage is an EMA of its share of assignments relative to uniform (1.0 = uniform share);
    # codes below the threshold are re-initialised from batch latents during training. 0 disables it.
    dead_code_threshold: float = 0.03
    usage_decay: float = 0.99
    gan_weight: float = 0.0  # 0 disables the PatchGAN; > 0 builds a discriminator and adds hinge losses
    gan_start_step: int = 0  # step from which the adversarial term enters the generator loss (D trains from 0)
    disc_channels: int = 32
    disc_layers: int = 2

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "z_channels",
                     "norm_groups", "code_dim", "disc_channels"):
            check_range(name, getattr(self, name), 1)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult={list(self.channel_mult)} must be a non-empty list of positive ints")
        check_range("codebook_size", self.codebook_size, 2)
        check_range("commitment_beta", self.commitment_beta, 0.0)
        check_range("codebook_loss_weight", self.codebook_loss_weight, 0.0)
        check_range("dead_code_threshold", self.dead_code_threshold, 0.0, 1.0, high_open=True)
        check_range("usage_decay", self.usage_decay, 0.0, 1.0, high_open=True)
        check_range("gan_weight", self.gan_weight, 0.0)
        check_range("gan_start_step", self.gan_start_step, 0)
        check_range("disc_layers", self.disc_layers, 1, 6)
        f = self.downsample_factor
        if self.image_size % f:
            raise ConfigError(f"image_size={self.image_size} is not divisible by the downsample factor {f} "
                              f"(2**(len(channel_mult)-1) with channel_mult={list(self.channel_mult)})")
        widths = sorted({self.base_channels * m for m in self.channel_mult} | {self.z_channels})
        if any(w % self.norm_groups for w in widths):
            raise ConfigError(f"norm_groups={self.norm_groups} must divide every width {widths} "
                              f"(base_channels * channel_mult and z_channels)")
        if self.gan_weight > 0 and self.image_size // 2 ** self.disc_layers < 3:
            raise ConfigError(f"disc_layers={self.disc_layers} is too deep for image_size={self.image_size}: "
                              f"needs image_size / 2**disc_layers >= 3")


class VQTokenizer(TesseraModel):
    """Images in [-1, 1] <-> (h, w) grids of code ids, trained with reconstruction + VQ (+ hinge GAN) losses."""

    kind = "vq"
    config_class = VQConfig
    ema_follows_live = ("quantizer.",)
    presets = {
        # CPU seconds: 32x32 -> 8x8 tokens.
        "tiny": {"image_size": 32, "base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                 "z_channels": 32, "norm_groups": 8, "codebook_size": 256, "usage_decay": 0.9,
                 "disc_channels": 32, "disc_layers": 2},
        # One H100, minutes: 64x64 -> 8x8 tokens.
        "small": {"image_size": 64, "base_channels": 64, "channel_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                  "z_channels": 64, "norm_groups": 32, "codebook_size": 4096, "usage_decay": 0.99,
                  "disc_channels": 64, "disc_layers": 3},
        # LlamaGen VQ-16: 256px -> 16x16 tokens, codebook 16384, code dim 8, GAN from 20k steps.
        "vq16": {"image_size": 256, "base_channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                 "z_channels": 256, "norm_groups": 32, "codebook_size": 16384, "code_dim": 8,
                 "usage_decay": 0.99, "gan_weight": 0.5, "gan_start_step": 20000, "disc_channels": 64,
                 "disc_layers": 3},
    }

    def __init__(self, config: VQConfig):
        super().__init__(config)
        c = config
        self.encoder = Encoder(c.in_channels, c.base_channels, c.channel_mult, c.num_res_blocks,
                               c.z_channels, c.norm_groups)
        self.quant_conv = nn.Conv2d(c.z_channels, c.code_dim, 1)
        self.quantizer = Quantizer(c.codebook_size, c.code_dim, c.l2_norm_codes, c.usage_decay,
                                   c.dead_code_threshold)
        self.post_quant_conv = nn.Conv2d(c.code_dim, c.z_channels, 1)
        self.decoder = Decoder(c.in_channels, c.base_channels, c.channel_mult, c.num_res_blocks,
                               c.z_channels, c.norm_groups)
        self.discriminator = PatchDiscriminator(c.in_channels, c.disc_channels, c.disc_layers) \
            if c.gan_weight > 0 else None

    # ----- properties ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def token_grid(self, image_size: int | None = None) -> tuple[int, int]:
        """(h, w) of the code grid for square images of `image_size` (default: the config's)."""
        size = self.config.image_size if image_size is None else image_size
        if size % self.downsample_factor:
            raise ValueError(f"image_size={size} is not divisible by the downsample factor {self.downsample_factor}")
        return size // self.downsample_factor, size // self.downsample_factor

    # ----- inference API ---------------------------------------------------------------------
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        if images.dim() != 4 or images.shape[1] != self.config.in_channels or images.shape[-1] % f \
                or images.shape[-2] % f:
            raise ValueError(f"expected (B, {self.config.in_channels}, H, W) images with H, W divisible by {f}, "
                             f"got {tuple(images.shape)}")
        return self.quant_conv(self.encoder(images.to(self.quant_conv.weight.dtype)))

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, H/f, W/f) int64 code ids; never changes codebook state."""
        return self.quantizer.lookup(self._latents(images))

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, code_dim, h, w) codebook vectors (unit-normalised when l2_norm_codes)."""
        return self.quantizer.embed(codes)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) latents -> (B, C, h*f, w*f) images clamped to [-1, 1]."""
        return self._decode_raw(z).clamp(-1, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, C, h*f, w*f) images clamped to [-1, 1]."""
        return self.decode_latent(self.code_embeddings(codes))

    def codebook_usage(self) -> float:
        """Fraction of codes alive by the usage EMA (above `dead_code_threshold`)."""
        return self.quantizer.alive_fraction()

    # ----- training --------------------------------------------------------------------------
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Unclamped reconstruction through the straight-through quantiser. In training mode this
        also updates the codebook usage EMA and restarts dead codes."""
        q = self.quantizer(self._latents(images))
        return self._decode_raw(q.z_q), q

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the discriminator; pass `fake` detached so only D is trained by it."""
        return 0.5 * (F.relu(1 - self._disc(real)).mean() + F.relu(1 + self._disc(fake)).mean())

    def adversarial_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """Generator hinge loss through a discriminator with detached parameters (D gets no gradient)."""
        frozen = {n: p.detach() for n, p in self.discriminator.named_parameters()}
        return -functional_call(self.discriminator, frozen, (fake,)).float().mean()

    def _disc(self, x: torch.Tensor) -> torch.Tensor:
        if self.discriminator is None:
            raise RuntimeError("this VQ tokenizer has no discriminator (gan_weight=0)")
        return self.discriminator(x).float()

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L2 reconstruction + codebook + beta * commitment (+ hinge GAN terms) on `batch["image"]`.

        `batch["step"]` (optional) gates the generator's adversarial term at `gan_start_step`;
        the discriminator's own loss is always included when the GAN is enabled.
        """
        c = self.config
        images = batch["image"]
        recon, q = self.reconstruct(images)
        rec_loss = F.mse_loss(recon.float(), images.float())
        total = rec_loss + c.codebook_loss_weight * q.codebook_loss + c.commitment_beta * q.commit_loss
        logs = {"rec_loss": rec_loss.detach(), "codebook_loss": q.codebook_loss.detach(),
                "commit_loss": q.commit_loss.detach(), "psnr": psnr(recon, images), "usage": q.usage,
                "perplexity": q.perplexity, "dead_restarts": q.restarts}
        if self.discriminator is not None:
            d_loss = self.discriminator_loss(images, recon.detach())
            total = total + d_loss
            logs["gan_d"] = d_loss.detach()
            logs["gan_g"] = torch.zeros((), device=images.device)
            if batch.get("step", c.gan_start_step) >= c.gan_start_step:
                g_loss = self.adversarial_loss(recon)
                total = total + c.gan_weight * g_loss
                logs["gan_g"] = g_loss.detach()
        return total, logs
