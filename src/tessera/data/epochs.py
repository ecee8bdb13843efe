"""Infinite training streams in epochs, with a position a resumed run continues from exactly.

Every loader slot (one DataLoader worker of one rank: slot = rank * workers + worker) reads its
share of the shards epoch after epoch. Epoch e permutes the shard list with (seed, e), and slot s
takes every n-th shard from position s. When there are fewer shards than slots, each slot reads
all of them in its own order. Samples are shuffled within the epoch by a buffer seeded with
(seed, slot, e). The stream of a slot is therefore a fixed function of (seed, slot, epoch).

Each sample carries `__position__` = (slot, epoch, samples emitted in that epoch so far), and a
batch carries its last sample's position under `"position"`. The trainer keeps the latest
position per slot. `StreamStart` replays each slot's epoch from its first shard and drops the
samples already emitted before they are decoded. So a resumed run continues the same stream and
sees no sample twice in an epoch; the replay costs one read of that epoch's raw bytes so far.
"""
from __future__ import annotations

import functools
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds

POSITION_KEY = "__position__"
Position = tuple[int, int]  # (epoch, samples emitted in that epoch)


@dataclass(frozen=True)
class StreamStart:
    """Where each loader slot resumes: `positions[slot] = (epoch, emitted)`, saved for `slots` slots."""

    slots: int
    positions: dict[int, Position] = field(default_factory=dict)


def loader_slot() -> tuple[int, int]:
    """(this slot, number of slots) from the torch.distributed rank and the DataLoader worker."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return rank * workers + worker, world * workers


def slot_shards(urls: list[str], seed: int, epoch: int, slot: int, slots: int) -> list[str]:
    """The shards slot `slot` of `slots` reads in `epoch`, in reading order."""
    order = list(urls)
    random.Random(wds.utils.make_seed(seed, epoch)).shuffle(order)
    if len(order) >= slots:
        return order[slot::slots]
    random.Random(wds.utils.make_seed(seed, epoch, slot)).shuffle(order)
    return order


def _first_position(start: StreamStart | None, slot: int, slots: int) -> Position:
    if start is None or not start.positions:
        return 0, 0
    if start.slots != slots:
        epoch = max(e for e, _ in start.positions.values()) + 1
        warnings.warn(f"the data position was saved for {start.slots} loader slots (ranks x workers), "
                      f"this run has {slots}: starting every slot at epoch {epoch}", stacklevel=2)
        return epoch, 0
    return start.positions.get(slot, (0, 0))


def epoch_samples(urls: list[str], read: Callable[[list[str]], Iterable[dict[str, Any]]], seed: int,
                  shuffle_buffer: int, start: StreamStart | None = None) -> Iterator[dict[str, Any]]:
    """This slot's raw samples forever, epoch by epoch, each tagged with its position."""
    slot, slots = loader_slot()
    epoch, skip = _first_position(start, slot, slots)
    while True:
        samples: Iterable[dict[str, Any]] = read(slot_shards(urls, seed, epoch, slot, slots))
        if shuffle_buffer > 1:
            rng = random.Random(wds.utils.make_seed(seed, slot, epoch))
            samples = wds.shuffle(shuffle_buffer, shuffle_buffer, rng=rng)(iter(samples))
        emitted = 0
        for emitted, sample in enumerate(samples, 1):
            if emitted > skip:
                yield {**sample, POSITION_KEY: (slot, epoch, emitted)}
        if emitted == 0:
            raise RuntimeError(f"epoch {epoch} of loader slot {slot} read no samples from {len(urls)} shard(s)")
        epoch, skip = epoch + 1, 0


def _decode_keeping_position(raw: dict[str, Any], decode: Callable[[dict[str, Any]], Any]) -> Any:
    out = decode(raw)
    if POSITION_KEY in raw and isinstance(out, dict):
        out[POSITION_KEY] = raw[POSITION_KEY]
    return out


def keep_position(decode: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """`decode` whose dict outputs keep the raw sample's position."""
    return functools.partial(_decode_keeping_position, decode=decode)


def _collate_with_position(samples: list[dict[str, Any]], collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
                           ) -> dict[str, Any]:
    positions = [s.pop(POSITION_KEY) for s in samples if POSITION_KEY in s]
    batch = collate(samples)
    if positions:
        batch["position"] = positions[-1]
    return batch


def batch_position(collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """`collate` that also sets `"position"`: (slot, epoch, emitted) of the batch's last sample."""
    return functools.partial(_collate_with_position, collate=collate)
