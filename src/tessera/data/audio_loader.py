"""The training batch loader over a folder of audio shards (`KEY.flac`, `KEY.txt`, `KEY.json`)."""
from __future__ import annotations

import functools
import io
import json
import random
from typing import Any, Iterable, Iterator

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from ..config import check_range
from .epochs import POSITION_KEY, StreamStart, batch_position
from .loader import ignore_stop_signals
from .shards import sample_pipeline


def decode_audio_sample(raw: dict[str, Any], sample_rate: int) -> dict[str, Any]:
    """{"audio": float32 (T,) in [-1, 1], "text": str, "meta": dict} from the flac/txt/json
    members; raises on an unreadable member, or a FLAC that is empty or not at `sample_rate` Hz."""
    try:
        audio, rate = sf.read(io.BytesIO(raw["flac"]), dtype="float32", always_2d=True)
    except sf.LibsndfileError as err:
        raise ValueError(f"{raw['__key__']}.flac is not readable audio: {err.error_string}") from None
    if rate != sample_rate:
        raise ValueError(f"{raw['__key__']}.flac is at {rate} Hz, not {sample_rate} Hz")
    if not len(audio):
        raise ValueError(f"{raw['__key__']}.flac holds no audio")
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json member is a {type(meta).__name__}, not an object")
    return {"audio": audio.mean(axis=1), "text": raw["txt"].decode("utf-8"), "meta": meta}


def _crop_or_pad(samples: Iterable[dict[str, Any]], length: int, seed: int) -> Iterator[dict[str, Any]]:
    """Each sample's audio as exactly `length` samples: a random window (seeded per rank and
    worker) of longer clips, zeros after shorter ones; "length" is how many are real."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(wds.utils.make_seed(seed, rank, worker))
    for sample in samples:
        audio = sample["audio"]
        if len(audio) > length:
            if POSITION_KEY in sample:
                rng = random.Random(wds.utils.make_seed(seed, *sample[POSITION_KEY]))
            start = rng.randint(0, len(audio) - length)
            audio = audio[start:start + length]
        valid = len(audio)
        yield {**sample, "audio": np.pad(audio, (0, length - valid)), "length": valid}


def collate_audio(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cropped samples: {"audio": (B, 1, T), "lengths": (B,) int64, "text": list, "meta": list}."""
    return {"audio": torch.from_numpy(np.stack([s["audio"] for s in samples]))[:, None],
            "lengths": torch.tensor([s["length"] for s in samples], dtype=torch.int64),
            "text": [s["text"] for s in samples],
            "meta": [s["meta"] for s in samples]}


def make_audio_loader(shards: str, batch_size: int, sample_rate: int, clip_seconds: float, *, num_workers: int = 0,
                      seed: int = 0, shuffle_buffer: int = 1000, infinite: bool = True,
                      start: StreamStart | None = None) -> torch.utils.data.DataLoader:
    """Batches `{"audio": (B, 1, T) float32 in [-1, 1], "lengths": (B,) int64 real samples before
    the zero padding, "text": list[str], "meta": list[dict]}` with T = round(clip_seconds *
    sample_rate) from the audio shard folder `shards`.

    Longer clips are cropped at a seeded random offset (seeded by the sample's stream position
    when it has one, so a resumed run crops alike), shorter ones zero-padded. Unreadable
    samples and FLACs at another rate are skipped and counted with a CorruptDataWarning.
    `infinite` and `start` as in `make_image_loader` (False: one pass ending with a partial batch).
    """
    check_range("batch_size", batch_size, 1)
    check_range("sample_rate", sample_rate, 1)
    check_range("clip_seconds", clip_seconds, 0, low_open=True)
    check_range("num_workers", num_workers, 0)
    length = round(clip_seconds * sample_rate)
    check_range("round(clip_seconds * sample_rate)", length, 1)
    decode = functools.partial(decode_audio_sample, sample_rate=sample_rate)
    pipeline = sample_pipeline(shards, decode, seed=seed, shuffle_buffer=shuffle_buffer, infinite=infinite, start=start)
    pipeline.append(functools.partial(_crop_or_pad, length=length, seed=seed))
    pipeline.append(wds.batched(batch_size, collation_fn=batch_position(collate_audio), partial=not infinite))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals if num_workers else None)
