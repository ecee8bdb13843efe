"""Audio codec (EnCodec / SoundStream family): SEANet encoder -> residual VQ -> SEANet decoder.

Mono waveforms in [-1, 1] become K parallel streams of code ids at `frame_rate` Hz (the streams
MAGNeT generates); any prefix of the streams decodes to coarser audio. Trained with waveform L1,
multi-resolution STFT and mel losses, RVQ codebook + commitment losses, and optionally EnCodec's
multi-scale STFT discriminator (hinge + feature matching).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..config import Config, ConfigError, check_range
from ..eval.audio_metrics import length_mask, multi_resolution_mel_distance, multi_resolution_stft_loss, si_snr
from ..modeling import TesseraModel
from .audio_modules import MultiScaleSTFTDiscriminator, SEANetDecoder, SEANetEncoder
from .residual_vq import ResidualVQ, ResidualVQOutput

SAMPLE_RATES = (16000, 24000)


@dataclass
class AudioCodecConfig(Config):
    """Mono audio codec. Hop = prod(strides) samples per frame; frame_rate = sample_rate / hop."""

    sample_rate: int = 16000  # 16000 or 24000
    clip_seconds: float = 1.0  # training crop length (EnCodec trains on 1 s segments)
    channels: int = 32  # base conv width (SEANet n_filters), doubled after every strided level
    strides: tuple[int, ...] = (2, 4, 5, 8)  # encoder downsampling, first to last (decoder mirrors)
    residual_units: int = 1  # SEANet residual units per level, dilations dilation_base**j
    dilation_base: int = 2
    norm: Literal["weight_norm", "none"] = "weight_norm"
    code_dim: int = 128  # encoder output width = codebook vector width
    num_codebooks: int = 4
    codebook_size: int = 1024
    quantizer_dropout: float = 0.0  # share of training examples that keep a random 1..K stages (SoundStream)
    # Per-stage code usage EMA (1.0 = uniform share); codes below the threshold restart from batch residuals.
    dead_code_threshold: float = 0.03
    usage_decay: float = 0.99
    l1_weight: float = 1.0  # waveform L1 (EnCodec uses 0.1 beside its GAN; phase needs more without one)
    stft_weight: float = 1.0  # multi-resolution STFT (spectral convergence + log magnitude)
    mel_weight: float = 1.0  # multi-resolution log-mel L1
    codebook_loss_weight: float = 1.0
    commitment_weight: float = 0.25
    stft_fft_sizes: tuple[int, ...] = (512, 1024, 2048)  # resolutions of the STFT and mel losses
    mel_bins: tuple[int, ...] = (32, 64, 128)  # mel bands at each of stft_fft_sizes
    gan_weight: float = 0.0  # 0 disables the MS-STFT discriminator; > 0 adds hinge adversarial losses
    feature_weight: float = 1.0  # feature-matching weight (relative L1 of D's hidden maps), with the GAN
    gan_start_step: int = 0  # step from which the generator's adversarial terms enter (D trains from 0)
    disc_channels: int = 32
    disc_fft_sizes: tuple[int, ...] = (1024, 2048, 512)

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def validate(self) -> None:
        if self.sample_rate not in SAMPLE_RATES:
            raise ConfigError(f"sample_rate={self.sample_rate} is not supported: use 16000 or 24000")
        check_range("clip_seconds", self.clip_seconds, 0.0, low_open=True)
        for name in ("channels", "residual_units", "dilation_base", "code_dim", "num_codebooks", "disc_channels"):
            check_range(name, getattr(self, name), 1)
        if not self.strides or min(self.strides) < 1:
            raise ConfigError(f"strides={list(self.strides)} must be a non-empty list of positive ints")
        check_range("codebook_size", self.codebook_size, 2)
        check_range("quantizer_dropout", self.quantizer_dropout, 0.0, 1.0)
        check_range("dead_code_threshold", self.dead_code_threshold, 0.0, 1.0, high_open=True)
        check_range("usage_decay", self.usage_decay, 0.0, 1.0, high_open=True)
        for name in ("l1_weight", "stft_weight", "mel_weight", "codebook_loss_weight", "commitment_weight",
                     "gan_weight", "feature_weight", "gan_start_step"):
            check_range(name, getattr(self, name), 0.0)
        for name in ("stft_fft_sizes", "disc_fft_sizes"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 16:
                raise ConfigError(f"{name}={list(sizes)} must be a non-empty list of FFT sizes >= 16")
        if len(self.mel_bins) != len(self.stft_fft_sizes) or min(self.mel_bins) < 1:
            raise ConfigError(f"mel_bins={list(self.mel_bins)} needs one positive count per stft_fft_sizes "
                              f"entry {list(self.stft_fft_sizes)}")


class AudioCodec(TesseraModel):
    """(B, 1, T) mono audio <-> (B, K, ceil(T / hop)) code ids of a K-stage residual VQ."""

    kind = "audio_codec"
    modality = "audio"
    config_class = AudioCodecConfig
    ema_follows_live = ("quantizer.",)
    presets = {
        # CPU seconds: 16 kHz, hop 40 (400 Hz frames), 4 x 64 codes of dim 16.
        "tiny": {"sample_rate": 16000, "channels": 8, "strides": [2, 4, 5], "code_dim": 16, "num_codebooks": 4,
                 "codebook_size": 64, "usage_decay": 0.9, "stft_fft_sizes": [128, 256, 512],
                 "mel_bins": [16, 32, 64], "disc_channels": 8, "disc_fft_sizes": [256, 512, 128]},
        # One H100, ~10 min: 16 kHz, hop 320 = 50 Hz frames, 4 x 1024 codes (2 kbps), as audio-MAGNeT.
        "small": {"sample_rate": 16000, "channels": 32, "strides": [2, 4, 5, 8], "code_dim": 128,
                  "num_codebooks": 4, "codebook_size": 1024},
        # 24 kHz, hop 480 = 50 Hz frames, 4 x 2048 codes (MusicGen's cardinality), twice the width.
        "base": {"sample_rate": 24000, "channels": 64, "strides": [3, 4, 5, 8], "code_dim": 128,
                 "num_codebooks": 4, "codebook_size": 2048},
    }

    def __init__(self, config: AudioCodecConfig):
        super().__init__(config)
        c = config
        self.encoder = SEANetEncoder(c.channels, c.strides, c.code_dim, c.residual_units, c.dilation_base, c.norm)
        self.quantizer = ResidualVQ(c.num_codebooks, c.codebook_size, c.code_dim, c.usage_decay,
                                    c.dead_code_threshold, c.quantizer_dropout)
        self.decoder = SEANetDecoder(c.channels, c.strides, c.code_dim, c.residual_units, c.dilation_base, c.norm)
        self.discriminator = MultiScaleSTFTDiscriminator(c.disc_fft_sizes, c.disc_channels) \
            if c.gan_weight > 0 else None

    # ----- properties ------------------------------------------------------------------------
    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        """Code frames per second (sample_rate / hop)."""
        return self.config.frame_rate

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def clip_seconds(self) -> float:
        return self.config.clip_seconds

    def num_frames(self, num_samples: int) -> int:
        """Code frames for a waveform of `num_samples`: ceil(num_samples / hop)."""
        return -(-num_samples // self.hop_length)

    # ----- inference API ---------------------------------------------------------------------
    def _latents(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[-1] < 1:
            raise ValueError(f"expected (B, 1, T) mono audio, got shape {tuple(wave.shape)}")
        pad = self.num_frames(wave.shape[-1]) * self.hop_length - wave.shape[-1]
        wave = F.pad(wave.to(next(self.encoder.parameters()).dtype), (0, pad))
        return self.encoder(wave)

    def _decode_raw(self, z: torch.Tensor, length: int | None) -> torch.Tensor:
        wave = self.decoder(z.to(next(self.decoder.parameters()).dtype))
        if length is not None:
            if not 0 < length <= wave.shape[-1]:
                raise ValueError(f"length={length} must lie in [1, {wave.shape[-1]}] for {z.shape[-1]} frames")
            wave = wave[..., :length]
        return wave

    @torch.no_grad()
    def encode(self, wave: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """(B, 1, T) audio -> (B, K, ceil(T / hop)) int64 code ids (the first `num_codebooks` streams,
        default all); the waveform is zero-padded to a whole number of frames. Never changes state."""
        return self.quantizer.encode(self._latents(wave), num_codebooks)

    def code_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K', T') code ids of the first K' <= K streams -> (B, code_dim, T') summed code vectors."""
        return self.quantizer.decode_codes(codes)

    def decode_latent(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(B, code_dim, T') latents -> (B, 1, T' * hop) audio clamped to [-1, 1], cropped to `length`."""
        return self._decode_raw(z, length).clamp(-1, 1)

    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(B, K', T') code ids (K' <= K: a coarse prefix) -> (B, 1, T' * hop) audio in [-1, 1], cropped
        to `length` samples when given (pass the original T to undo encode's padding)."""
        return self.decode_latent(self.code_latents(codes), length)

    def codebook_usage(self) -> list[float]:
        """Per stage, the fraction of codes alive by the usage EMA."""
        return self.quantizer.alive_fraction()

    # ----- training --------------------------------------------------------------------------
    def reconstruct(self, wave: torch.Tensor) -> tuple[torch.Tensor, ResidualVQOutput]:
        """Unclamped (B, 1, T) reconstruction through the straight-through RVQ. In training mode this
        also updates code usage, restarts dead codes and applies quantiser dropout."""
        q = self.quantizer(self._latents(wave))
        return self._decode_raw(q.z_q, wave.shape[-1]), q

    def _disc(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        if self.discriminator is None:
            raise RuntimeError("this audio codec has no discriminator (gan_weight=0)")
        return self.discriminator(x) if params is None else functional_call(self.discriminator, params, (x,))

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the discriminator, mean over scales; pass `fake` detached so only D is trained."""
        terms = [F.relu(1 - lr.float()).mean() + F.relu(1 + lf.float()).mean()
                 for (lr, _), (lf, _) in zip(self._disc(real), self._disc(fake))]
        return torch.stack(terms).mean()

    def adversarial_losses(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator hinge loss mean(relu(1 - D(fake))) and feature matching (L1 between D's hidden maps on
        fake and real, each divided by the real map's mean magnitude), through a discriminator with
        detached parameters: D gets no gradient from either."""
        frozen = {n: p.detach() for n, p in self.discriminator.named_parameters()}
        with torch.no_grad():
            real_out = self._disc(real)
        adv, feat = [], []
        for (logits, fake_maps), (_, real_maps) in zip(self._disc(fake, frozen), real_out):
            adv.append(F.relu(1 - logits.float()).mean())
            feat += [(f.float() - r.float()).abs().mean() / r.float().abs().mean().clamp_min(1e-8)
                     for f, r in zip(fake_maps, real_maps)]
        return torch.stack(adv).mean(), torch.stack(feat).mean()

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted waveform L1 + MR-STFT + mel + codebook + commitment (+ GAN) losses on `batch["audio"]`
        (B, 1, T); samples past `batch["lengths"]` (optional) are masked out. `batch["step"]` (optional)
        gates the generator's adversarial terms at `gan_start_step`; captions are ignored."""
        c = self.config
        audio = batch["audio"]
        recon, q = self.reconstruct(audio)
        audio, recon = audio.float(), recon.float()
        lengths = batch.get("lengths")
        if lengths is not None:
            mask = length_mask(lengths.to(audio.device), audio.shape[-1])[:, None]
            audio, recon = audio * mask, recon * mask
            l1 = ((recon - audio).abs() * mask).sum() / mask.sum().clamp_min(1)
        else:
            l1 = (recon - audio).abs().mean()
        stft = multi_resolution_stft_loss(recon, audio, c.stft_fft_sizes)
        mel = multi_resolution_mel_distance(recon, audio, c.sample_rate, c.stft_fft_sizes, c.mel_bins)
        total = (c.l1_weight * l1 + c.stft_weight * stft + c.mel_weight * mel
                 + c.codebook_loss_weight * q.codebook_loss + c.commitment_weight * q.commit_loss)
        with torch.no_grad():
            snr = si_snr(recon, audio, lengths).mean()
        logs = {"l1": l1.detach(), "stft": stft.detach(), "mel": mel.detach(),
                "codebook_loss": q.codebook_loss.detach(), "commit_loss": q.commit_loss.detach(), "si_snr": snr,
                "dead_restarts": q.restarts}
        for k in range(c.num_codebooks):
            logs[f"usage_q{k}"] = q.usage[k]
            logs[f"perplexity_q{k}"] = q.perplexity[k]
        if self.discriminator is not None:
            d_loss = self.discriminator_loss(audio, recon.detach())
            total = total + d_loss
            logs["gan_d"] = d_loss.detach()
            logs["gan_g"] = logs["gan_feat"] = torch.zeros((), device=audio.device)
            if batch.get("step", c.gan_start_step) >= c.gan_start_step:
                g_loss, feat = self.adversarial_losses(audio, recon)
                total = total + c.gan_weight * g_loss + c.feature_weight * feat
                logs["gan_g"], logs["gan_feat"] = g_loss.detach(), feat.detach()
        return total, logs
