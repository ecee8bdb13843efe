"""Codebook interleaving patterns (MusicGen): how K parallel code streams of T frames are laid
out as a sequence of S steps of U slots each, for a next-token generator.

Pure tensor functions, no model code. A pattern's layout says, for every sequence step s and
slot u, which code (codebook k, frame t) sits there, or that the slot is *invalid* (a hole
filled with a caller-given special token, e.g. `vocab_size`). Every (k, t) sits in exactly one
slot, so `revert(build(codes)) == codes`.

Patterns (K streams, T frames):

- `parallel`: S = T, U = K; step t holds (k, t) for every k in slot k. No dependence between
  the streams of one frame (MAGNeT's layout; the weakest AR model).
- `delay` (MusicGen's default, `delays=[0, 1, .., K-1]`): S = T + K - 1, U = K; step s holds
  (k, s - k) in slot k, invalid where s - k is outside [0, T). (k, t) comes after (k', t')
  exactly when t' + k' < t + k: after the coarser streams 0..k-1 of its own frame and after
  streams 0..k of every earlier frame (not after finer streams of the last few frames).
- `flattened` (unrolled; MusicGen's "flattening" with no delays): S = K * T, U = 1; step
  t * K + k holds (k, t) (frame-major, codebook-minor). Full autoregression, K times longer.
- `coarse_first` (audiocraft's CoarseFirstPattern with its default delays [0] * (K - 1)):
  S = 2 T (T when K = 1), U = K; steps 0..T-1 hold stream 0 of frame s in slot 0 (other slots
  invalid), steps T..2T-1 hold streams 1..K-1 of frame s - T in parallel in slots 1..K-1 (slot 0
  invalid). The fine streams see *all* of stream 0 (audiocraft warns that such a model must
  generate its full training duration: the fine phase starts at step T).

MusicGen's extra leading "empty" step is not part of these layouts: a generator's condition
prefix plays its role (the output at the last prefix slot predicts step 0).

In every pattern but `flattened`, slot u always holds codebook u; in `flattened` the single
slot's codebook is the step's `s % K`. `codebook_index` gives that table for any pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import torch

PatternName = Literal["delay", "parallel", "flattened", "coarse_first"]
PATTERNS: tuple[str, ...] = get_args(PatternName)


@dataclass(frozen=True)
class Layout:
    """Where every code of a (K, T) stream grid sits in a pattern's (S, U) sequence.

    codebook: (S, U) long, the codebook of each slot (also of invalid slots: the table their
    special token is embedded with). frame: (S, U) long, the frame of each slot, -1 where
    invalid. valid: (S, U) bool. position: (K, T) long, the flat slot index s * U + u of (k, t).
    """

    pattern: str
    num_codebooks: int
    num_frames: int
    codebook: torch.Tensor
    frame: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.codebook.shape[0]

    @property
    def slots(self) -> int:
        return self.codebook.shape[1]


def _check(pattern: str, num_codebooks: int, num_frames: int) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown codebook pattern {pattern!r}; patterns: {', '.join(PATTERNS)}")
    if num_codebooks < 1 or num_frames < 1:
        raise ValueError(f"a pattern needs K >= 1 streams of T >= 1 frames, got K={num_codebooks}, T={num_frames}")


def slots(pattern: str, num_codebooks: int) -> int:
    """U: slots per sequence step (1 for `flattened`, K otherwise)."""
    _check(pattern, num_codebooks, 1)
    return 1 if pattern == "flattened" else num_codebooks


def steps(pattern: str, num_codebooks: int, num_frames: int) -> int:
    """S: sequence steps that hold K streams of T frames."""
    _check(pattern, num_codebooks, num_frames)
    k, t = num_codebooks, num_frames
    if pattern == "parallel":
        return t
    if pattern == "delay":
        return t + k - 1
    if pattern == "flattened":
        return k * t
    return 2 * t if k > 1 else t  # coarse_first


def frames(pattern: str, num_codebooks: int, num_steps: int) -> int:
    """T: the number of frames whose layout has `num_steps` steps (inverse of `steps`)."""
    k = num_codebooks
    t = {"parallel": num_steps, "delay": num_steps - k + 1, "flattened": num_steps // k,
         "coarse_first": num_steps // 2 if k > 1 else num_steps}.get(pattern, 0)
    _check(pattern, k, max(t, 1))
    if t < 1 or steps(pattern, k, t) != num_steps:
        raise ValueError(f"{num_steps} steps is not a whole {pattern} layout of {k} streams")
    return t


@lru_cache(maxsize=64)
def _layout_cpu(pattern: str, num_codebooks: int, num_frames: int) -> Layout:
    _check(pattern, num_codebooks, num_frames)
    k_, t_ = num_codebooks, num_frames
    s_, u_ = steps(pattern, k_, t_), slots(pattern, k_)
    step = torch.arange(s_)[:, None]
    slot = torch.arange(u_)[None, :]
    if pattern == "flattened":
        codebook = step % k_
        frame = step // k_
    else:
        codebook = slot.expand(s_, u_)
        if pattern == "parallel":
            frame = step.expand(s_, u_)
        elif pattern == "delay":
            frame = step - slot
        elif k_ == 1:  # coarse_first with one stream is parallel
            frame = step.expand(s_, u_)
        else:  # coarse_first
            frame = torch.where((step < t_) == (slot == 0), step % t_, -1)
    frame = torch.where((frame >= 0) & (frame < t_), frame, -1).contiguous()
    codebook = codebook.contiguous()
    valid = frame >= 0
    position = torch.empty(k_ * t_, dtype=torch.long)
    flat_slots = torch.arange(s_ * u_).reshape(s_, u_)
    position[(codebook * t_ + frame)[valid]] = flat_slots[valid]
    return Layout(pattern, k_, t_, codebook, frame, valid, position.reshape(k_, t_))


def layout(pattern: str, num_codebooks: int, num_frames: int, device: torch.device | str | None = None) -> Layout:
    """The layout of K = `num_codebooks` streams of T = `num_frames` frames (cached on CPU)."""
    cpu = _layout_cpu(pattern, num_codebooks, num_frames)
    if device is None or torch.device(device).type == "cpu":
        return cpu
    return Layout(cpu.pattern, cpu.num_codebooks, cpu.num_frames,
                  *(t.to(device) for t in (cpu.codebook, cpu.frame, cpu.valid, cpu.position)))


def codebook_index(pattern: str, num_codebooks: int, num_frames: int) -> torch.Tensor:
    """(S, U) the codebook of each slot (which embedding table and head it uses)."""
    return layout(pattern, num_codebooks, num_frames).codebook


def valid_mask(pattern: str, num_codebooks: int, num_frames: int) -> torch.Tensor:
    """(S, U) True where a slot holds a code, False for the special-token holes."""
    return layout(pattern, num_codebooks, num_frames).valid


def build(codes: torch.Tensor, pattern: str, special: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (B, K, T) -> (sequence (B, S, U) with `special` in the invalid slots, valid (S, U))."""
    if codes.dim() != 3:
        raise ValueError(f"expected codes (B, K, T), got shape {tuple(codes.shape)}")
    b, k, t = codes.shape
    lay = layout(pattern, k, t, codes.device)
    # Gather from the flat codes with one extra column holding the special token.
    source = torch.where(lay.valid, lay.codebook * t + lay.frame, k * t)
    flat = torch.cat([codes.reshape(b, k * t), codes.new_full((b, 1), special)], 1)
    return flat[:, source.flatten()].reshape(b, *lay.valid.shape), lay.valid


def revert(sequence: torch.Tensor, pattern: str, num_frames: int, num_codebooks: int | None = None) -> torch.Tensor:
    """sequence (B, S, U) -> codes (B, K, T); invalid slots are ignored. K is U except for
    `flattened` (U = 1), where it is S / T unless given."""
    if sequence.dim() != 3:
        raise ValueError(f"expected a sequence (B, S, U), got shape {tuple(sequence.shape)}")
    b, s, u = sequence.shape
    if num_codebooks is None:
        num_codebooks = s // max(num_frames, 1) if pattern == "flattened" else u
    lay = layout(pattern, num_codebooks, num_frames, sequence.device)
    if (lay.num_steps, lay.slots) != (s, u):
        raise ValueError(f"a {pattern} layout of {num_codebooks} streams x {num_frames} frames has shape "
                         f"({lay.num_steps}, {lay.slots}), got ({s}, {u})")
    return sequence.reshape(b, s * u)[:, lay.position.flatten()].reshape(b, num_codebooks, num_frames)
