"""The training batch loader over a folder of WebDataset shards, and caption / class-name readers."""
from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..config import check_range
from .epochs import StreamStart, batch_position
from .shards import decode_sample, read_info, sample_pipeline, to_rgb


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, R, R) float32 in [-1, 1]: RGB (grayscale and alpha handled by `to_rgb`), centre-cropped
    to a square if needed, resized with bicubic filtering when not already R x R."""
    image = to_rgb(image)
    w, h = image.size
    if w != h:
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div_(127.5).sub_(1.0)


def _decode_for_training(raw: dict[str, Any], resolution: int) -> dict[str, Any]:
    sample = decode_sample(raw)
    return {"image": image_to_tensor(sample.image, resolution), "text": sample.text, "class": sample.cls,
            "meta": sample.meta}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into a batch dict (image, text, class, meta)."""
    return {"image": torch.stack([s["image"] for s in samples]),
            "text": [s["text"] for s in samples],
            "class": torch.tensor([s["class"] for s in samples], dtype=torch.int64),
            "meta": [s["meta"] for s in samples]}


def make_image_loader(shards: str, batch_size: int, resolution: int, *, num_workers: int = 0, seed: int = 0,
                      shuffle_buffer: int = 1000, infinite: bool = True, start: StreamStart | None = None
                      ) -> Iterable[dict]:
    """Batches `{"image": (B, 3, R, R) float32 in [-1, 1], "text": list[str], "class": (B,) int64
    (-1 where a sample has no class), "meta": list[dict]}` from the shard folder `shards`.

    Grayscale and RGBA images become RGB (alpha over white); images not R x R are centre-cropped
    to a square and resized bicubically. `infinite=True` reads epochs forever (training; batches
    carry their stream `position`, and `start` resumes from saved positions, see `epochs.py`);
    `infinite=False` is one pass split across torch.distributed ranks and DataLoader workers,
    ending with a partial batch. Unreadable samples are skipped with a
    CorruptDataWarning. `num_workers=0` decodes in this process.
    """
    check_range("batch_size", batch_size, 1)
    check_range("resolution", resolution, 1)
    check_range("num_workers", num_workers, 0)
    decode = functools.partial(_decode_for_training, resolution=resolution)
    pipeline = sample_pipeline(shards, decode, seed=seed, shuffle_buffer=shuffle_buffer, infinite=infinite, start=start)
    pipeline.append(wds.batched(batch_size, collation_fn=batch_position(collate), partial=not infinite))
    return worker_loader(pipeline, num_workers, infinite)


def worker_loader(pipeline: wds.DataPipeline, num_workers: int, infinite: bool) -> Iterable[dict]:
    """The batched `pipeline` itself (`num_workers=0`: read in this process) or a DataLoader over it."""
    if num_workers == 0:
        return pipeline
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       persistent_workers=infinite, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops training cleanly
    (a Ctrl-C or `timeout` reaches the whole process group); workers exit with their parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def read_class_names(shards: str | Path) -> list[str] | None:
    """The class names recorded in the folder's dataset.json, or None (no file, or not class-conditional)."""
    info = read_info(shards)
    return info.get("class_names") if info else None


def _caption(raw: dict[str, Any]) -> str:
    return raw["txt"].decode("utf-8")


def iter_captions(shards: str | Path) -> Iterator[str]:
    """Every caption in the folder, in shard order, in one finite pass (all ranks see all of them)."""
    yield from sample_pipeline(shards, _caption, shuffle_buffer=0, infinite=False, split=False,
                               select=lambda name: name.endswith(".txt"))
