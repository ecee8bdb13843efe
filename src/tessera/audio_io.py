"""Waveform tensors -> WAV files, written atomically."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import soundfile
import torch


def save_wav(wave: torch.Tensor, path: str | Path, sample_rate: int) -> Path:
    """One (1, T) or (T,) waveform in [-1, 1] as 16-bit PCM WAV, under a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = wave.detach().float().clamp(-1, 1).reshape(-1).cpu().numpy()
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.wav"
    soundfile.write(str(tmp), samples, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return path


def save_wavs(waves: torch.Tensor, path: str | Path, sample_rate: int) -> list[Path]:
    """(N, 1, T) waveforms: `path` itself for N = 1, else `<stem>-<i><suffix>` beside it."""
    path = Path(path)
    if waves.shape[0] == 1:
        return [save_wav(waves[0], path, sample_rate)]
    return [save_wav(w, path.with_name(f"{path.stem}-{i}{path.suffix}"), sample_rate) for i, w in enumerate(waves)]


def join_with_silence(waves: torch.Tensor, sample_rate: int, gap_seconds: float = 0.25) -> torch.Tensor:
    """(N, 1, T) -> (1, N * T + (N - 1) * gap) clips played one after another."""
    gap = torch.zeros(1, int(gap_seconds * sample_rate), dtype=waves.dtype, device=waves.device)
    parts: list[torch.Tensor] = []
    for i, wave in enumerate(waves):
        parts += [gap] if i else []
        parts.append(wave.reshape(1, -1))
    return torch.cat(parts, 1)

