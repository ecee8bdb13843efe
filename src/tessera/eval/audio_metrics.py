"""Audio metrics and spectral losses in plain torch: SI-SNR, multi-resolution STFT loss, mel distance.

The mel filterbank uses the HTK mel scale (mel = 2595 * log10(1 + f / 700)) with triangular filters
of peak 1 (no area normalisation). No torchaudio or librosa dependency.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch

_MAG_FLOOR = 1e-7  # floor of |STFT|^2 before the square root: keeps gradients finite on silence
_MEL_FLOOR = 1e-5  # floor of mel magnitudes before the log


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 1, T) or (B, T) -> (B, T) float32."""
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 2:
        raise ValueError(f"{name} must be (B, 1, T) or (B, T) audio, got shape {tuple(x.shape)}")
    return x.float()


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_batch(x, "estimate"), _as_batch(y, "reference")
    if x.shape != y.shape:
        raise ValueError(f"estimate and reference differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def length_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """(B,) valid sample counts -> (B, total) float mask of ones over each item's valid samples."""
    return (torch.arange(total, device=lengths.device)[None] < lengths[:, None]).float()


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SNR in dB per item, (B,): both signals made zero-mean over their valid samples,
    the estimate split into its projection on the reference (target) and the rest (noise),
    10 * log10(|target|^2 / |noise|^2). Identical signals give a large finite value (about 10*log10(|x|^2 / eps))."""
    x, y = _pair(estimate, reference)
    mask = torch.ones_like(x) if lengths is None else length_mask(lengths.to(x.device), x.shape[1])
    count = mask.sum(1, keepdim=True).clamp_min(1)
    x = (x - (x * mask).sum(1, keepdim=True) / count) * mask
    y = (y - (y * mask).sum(1, keepdim=True) / count) * mask
    scale = (x * y).sum(1, keepdim=True) / (y.pow(2).sum(1, keepdim=True) + eps)
    target = scale * y
    noise = x - target
    return 10 * torch.log10((target.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps))


def stft_magnitude(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    """(B, T) -> (B, n_fft // 2 + 1, frames) magnitude: Hann window of n_fft, hop n_fft // 4, centred
    with zero padding (so any length works)."""
    with torch.autocast(x.device.type, enabled=False):
        spec = torch.stft(x.float(), n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft, device=x.device),
                          center=True, pad_mode="constant", return_complex=True)
        return (spec.real.pow(2) + spec.imag.pow(2)).clamp_min(_MAG_FLOOR).sqrt()


def multi_resolution_stft_loss(x: torch.Tensor, y: torch.Tensor,
                               fft_sizes: tuple[int, ...] = (512, 1024, 2048)) -> torch.Tensor:
    """Mean over resolutions of spectral convergence (||Y| - |X||_F / ||Y||_F) plus log-magnitude L1,
    for estimate `x` and reference `y` (Parallel WaveGAN's loss); a 0-d tensor."""
    x, y = _pair(x, y)
    total = x.new_zeros(())
    for n_fft in fft_sizes:
        mx, my = stft_magnitude(x, n_fft), stft_magnitude(y, n_fft)
        convergence = torch.linalg.norm(my - mx) / torch.linalg.norm(my).clamp_min(1e-7)
        total = total + convergence + (my.log() - mx.log()).abs().mean()
    return total / len(fft_sizes)


def _hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) HTK-mel triangular filters of peak 1 over [f_min, f_max] (default Nyquist).

    Filter i rises linearly from mel point i to point i + 1 and falls to point i + 2, with n_mels + 2
    points evenly spaced in mel; every FFT bin strictly inside (f_min, f_max) has positive total weight."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}, "
                         f"sample_rate={sample_rate}")
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"need n_mels >= 1 and n_fft >= 2, got n_mels={n_mels}, n_fft={n_fft}")
    return _mel_filterbank(n_fft, n_mels, sample_rate, float(f_min), float(f_max)).clone()


@functools.lru_cache(maxsize=32)
def _mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    points = _mel_to_hz(torch.linspace(float(_hz_to_mel(f_min)), float(_hz_to_mel(f_max)), n_mels + 2,
                                       dtype=torch.float64))
    left, centre, right = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (freqs[None] - left) / (centre - left)
    falling = (right - freqs[None]) / (right - centre)
    return torch.minimum(rising, falling).clamp_min(0).float()


def multi_resolution_mel_distance(x: torch.Tensor, y: torch.Tensor, sample_rate: int,
                                  fft_sizes: tuple[int, ...] = (512, 1024, 2048),
                                  n_mels: tuple[int, ...] = (32, 64, 128)) -> torch.Tensor:
    """Mean over resolutions of the L1 distance between log10 mel magnitudes (floored at 1e-5) of
    estimate `x` and reference `y`; `n_mels[i]` mel bands at `fft_sizes[i]`. A 0-d tensor."""
    if len(fft_sizes) != len(n_mels):
        raise ValueError(f"fft_sizes {list(fft_sizes)} and n_mels {list(n_mels)} must have the same length")
    x, y = _pair(x, y)
    total = x.new_zeros(())
    for n_fft, mels in zip(fft_sizes, n_mels):
        bank = _mel_filterbank(n_fft, mels, sample_rate, 0.0, sample_rate / 2).to(x.device)
        mx = torch.einsum("mf,bft->bmt", bank, stft_magnitude(x, n_fft))
        my = torch.einsum("mf,bft->bmt", bank, stft_magnitude(y, n_fft))
        total = total + (mx.clamp_min(_MEL_FLOOR).log10() - my.clamp_min(_MEL_FLOOR).log10()).abs().mean()
    return total / len(fft_sizes)


@torch.no_grad()
def codec_report(codec: Any, batches: Iterable[Any], max_batches: int | None = None,
                 num_codebooks: int | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Mean per-item SI-SNR (dB) and mean mel distance of `codec`'s reconstructions (encode -> decode
    with the first `num_codebooks` streams, default all) over up to `max_batches` batches. A batch is
    a (B, 1, T) tensor or a dict with "audio" and optional "lengths" (samples past them are ignored)."""
    device = torch.device(device) if device is not None else next(codec.parameters()).device
    was_training = codec.training
    codec.eval()
    k = codec.config.num_codebooks if num_codebooks is None else num_codebooks
    snr_sum, mel_sum, items, n_batches = 0.0, 0.0, 0, 0
    counts = torch.zeros(k, codec.config.codebook_size, dtype=torch.long, device=device)
    try:
        for batch in batches:
            if max_batches is not None and n_batches >= max_batches:
                break
            audio = (batch["audio"] if isinstance(batch, dict) else batch).to(device)
            lengths = batch.get("lengths") if isinstance(batch, dict) else None
            codes = codec.encode(audio, num_codebooks=k)
            recon = codec.decode(codes, length=audio.shape[-1]).float()
            if lengths is not None:
                mask = length_mask(lengths.to(device), audio.shape[-1])[:, None]
                audio, recon = audio.float() * mask, recon * mask
            snr_sum += float(si_snr(recon, audio, lengths).sum())
            mel_sum += float(multi_resolution_mel_distance(recon, audio, codec.config.sample_rate)) * audio.shape[0]
            counts += torch.stack([torch.bincount(codes[:, i].flatten(), minlength=counts.shape[1]) for i in range(k)])
            items += audio.shape[0]
            n_batches += 1
    finally:
        codec.train(was_training)
    if items == 0:
        raise ValueError("codec_report got no audio batches")
    bits = k * math.log2(codec.config.codebook_size) * codec.frame_rate
    return {"items": items, "batches": n_batches, "num_codebooks": k, "si_snr_db": snr_sum / items,
            "mel_distance": mel_sum / items, "bitrate_kbps": bits / 1000,
            "codebook_usage": [float((row > 0).float().mean()) for row in counts]}
