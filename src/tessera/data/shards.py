"""WebDataset shards: a dataset folder written atomically, and read without crashing on bad data.

A dataset folder holds `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... (samples `KEY.png`,
`KEY.txt`, `KEY.json` and, for class-conditional data, `KEY.cls`; audio datasets hold `KEY.flac`
instead of `KEY.png`; the layout `webdataset.ShardWriter` writes) and `dataset.json` (source,
licence, count, resolution or sample rate, class names). The folder is built under a temporary
name and renamed into place when complete. Readers skip, count and warn about undecodable
samples and truncated shards.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from .. import __version__
from ..checkpoint import atomic_directory
from ..config import ConfigError, check_range
from .epochs import StreamStart, epoch_samples, keep_position

INFO_FILE = "dataset.json"
SHARD_SUFFIX = ".tar"
_TAR_MTIME = 0  # fixed member timestamps: the same samples give byte-identical shards
_MAX_SKIPS_IN_A_ROW = 1000


class CorruptDataWarning(UserWarning):
    """Unreadable samples or shard tails were skipped while reading shards."""


@dataclasses.dataclass
class DatasetInfo:
    """What `dataset.json` records besides the counts and shard names the writer adds."""

    name: str
    source: str
    license: str
    resolution: int
    class_names: list[str] | None = None
    description: str = ""
    sample_rate: int = 0  # audio datasets: Hz of every clip (0 for images)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy of any PIL image; transparency is composited onto `background`."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """PNG file bytes of `image` (lossless, in its own mode)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class DatasetWriter:
    """Context manager writing samples into shards of `per_shard` samples in a new folder `out`.

    `out` must be new, empty, or an earlier dataset folder (then it is replaced). Nothing
    appears at `out` unless the block finishes without an exception.
    """

    def __init__(self, out: str | Path, info: DatasetInfo, prefix: str = "data", per_shard: int = 5000) -> None:
        check_range("per_shard", per_shard, 1)
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir())
                                                            and not (self.out / INFO_FILE).exists())):
            raise ConfigError(f"{self.out} exists and is not a dataset folder; give a new or empty output folder")
        self._base = info
        self.prefix = prefix
        self.per_shard = per_shard
        self.count = 0
        self.shards: list[str] = []
        self.keys: set[str] = set()
        self.info: dict[str, Any] = {}
        self._folder = atomic_directory(self.out)
        self._tmp: Path | None = None
        self._tar: wds.TarWriter | None = None

    def __enter__(self) -> DatasetWriter:
        self._tmp = self._folder.__enter__()
        return self

    def _folder_path(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("DatasetWriter used outside its `with` block")
        return self._tmp

    def write(self, key: str, image: Image.Image, text: str, meta: dict[str, Any], cls: int | None = None) -> None:
        """Add one sample (its image is stored as PNG in the mode it has)."""
        fields = {"png": encode_png(image), "txt": text.encode("utf-8"),
                  "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        if cls is not None:
            fields["cls"] = str(int(cls)).encode("ascii")
        self.write_record(key, fields)

    def write_record(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample of already-encoded members, `{extension: bytes}` (stored as `KEY.extension`)."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if self._tar is None or self.count % self.per_shard == 0:
            self._tar = self._next_shard()
        self._tar.write({"__key__": key, **fields})
        self.keys.update(fields)
        self.count += 1

    def _next_shard(self) -> wds.TarWriter:
        if self._tar is not None:
            self._tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}{SHARD_SUFFIX}"
        self.shards.append(name)
        return wds.TarWriter(str(self._folder_path() / name), encoder=False, mtime=_TAR_MTIME)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tar is not None:
            self._tar.close()
        if exc_type is None and self.count == 0:
            exc = ConfigError(f"no samples were written for {self.out}")
            self._folder.__exit__(ConfigError, exc, None)
            raise exc
        if exc_type is None:
            self.info = {**dataclasses.asdict(self._base), "count": self.count, "shards": self.shards,
                         "per_shard": self.per_shard, "keys": sorted(self.keys), "format": "webdataset",
                         "created_by": f"tessera {__version__}"}
            text = json.dumps(self.info, indent=2, ensure_ascii=False) + "\n"
            (self._folder_path() / INFO_FILE).write_text(text)
        self._folder.__exit__(exc_type, exc, tb)


def list_shards(folder: str | Path) -> list[str]:
    """Sorted paths of the `*.tar` shards in `folder`; FileNotFoundError when there are none."""
    path = Path(folder)
    shards = sorted(str(p) for p in path.glob(f"*{SHARD_SUFFIX}")) if path.is_dir() else []
    if not shards:
        why = "does not exist" if not path.exists() else "is not a folder" if not path.is_dir() else "holds no *.tar"
        raise FileNotFoundError(f"no WebDataset shards: {path} {why}")
    return shards


def read_info(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `dataset.json` as a dict, or None when it has none."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


@dataclasses.dataclass
class Sample:
    """One sample decoded from its tar members."""

    key: str
    image: Image.Image
    text: str
    meta: dict[str, Any]
    cls: int  # -1 when the sample has no class


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Decode the png/txt/json(/cls) members; any missing or unreadable member raises."""
    image = Image.open(io.BytesIO(raw["png"]))
    image.load()
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json member is a {type(meta).__name__}, not an object")
    cls = int(raw["cls"]) if "cls" in raw else -1
    return Sample(raw["__key__"], image, raw["txt"].decode("utf-8"), meta, cls)


class SkipCounter:
    """WebDataset exception handler: counts what was skipped and warns at counts 1, 2, 4, 8, ...

    `track` marks samples that came through; many skips in a row with none readable raise.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self.warned = 0
        self.in_a_row = 0

    def __call__(self, exc: Exception) -> bool:
        self.count += 1
        self.in_a_row += 1
        if self.in_a_row > _MAX_SKIPS_IN_A_ROW:
            raise RuntimeError(f"{self.where}: {self.in_a_row} unreadable samples in a row; "
                               f"latest: {type(exc).__name__}: {exc}") from exc
        if self.count & (self.count - 1) == 0:
            self._warn(f"latest: {type(exc).__name__}: {str(exc)[:200]}")
        return True

    def _warn(self, detail: str) -> None:
        self.warned = self.count
        warnings.warn(f"{self.where}: skipped {self.count} unreadable sample(s) or truncated shard tail(s) "
                      f"so far; {detail}", CorruptDataWarning, stacklevel=2)

    def track(self, samples: Iterable[Any]) -> Iterator[Any]:
        """Pass samples through; at the end of a finite pass warn with the final count."""
        for sample in samples:
            self.in_a_row = 0
            yield sample
        if self.count > self.warned:
            self._warn("end of pass")


def _open_shards(shards: Iterable[dict[str, Any]], handler: SkipCounter) -> Iterator[dict[str, Any]]:
    """Open each shard file, closing it when the next is requested (webdataset's opener leaves files open)."""
    for shard in shards:
        try:
            stream = open(shard["url"], "rb")
        except OSError as exc:
            handler(exc)
            continue
        with stream:
            yield {**shard, "stream": stream}


def _worker_shuffle(samples: Iterable[Any], bufsize: int, seed: int) -> Iterator[Any]:
    """Buffer shuffle seeded by (seed, rank, worker): reproducible, different per worker."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(wds.utils.make_seed(seed, rank, worker))
    return wds.shuffle(bufsize, bufsize, rng=rng)(iter(samples))


def _read_shards(shards: Iterable[dict[str, Any]], handler: SkipCounter,
                 select: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes grouped by key) of the shards `{"url": path}`, in order."""
    opened = _open_shards(shards, handler=handler)
    return group_by_keys(tar_file_expander(opened, handler=handler, select_files=select), handler=handler)


def _read_urls(urls: list[str], handler: SkipCounter, select: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    return _read_shards(({"url": url} for url in urls), handler, select)


def sample_pipeline(shards: str | Path, decode: Callable[[dict[str, Any]], Any], *, seed: int = 0,
                    shuffle_buffer: int = 1000, infinite: bool = True, split: bool = True,
                    select: Callable[[str], bool] | None = None, start: StreamStart | None = None) -> wds.DataPipeline:
    """Samples from the shards in folder `shards`, each passed through `decode`.

    infinite: epochs without end, each slot (rank x worker) reading its share of a per-epoch
    shard permutation, shuffled within the epoch and tagged with its position (see `epochs.py`;
    `start` resumes from saved positions); otherwise one pass, shards shuffled by `seed` and,
    when `split`, divided among torch.distributed ranks and then DataLoader workers.
    `shuffle_buffer` (0 = off, and then shards keep their order) shuffles raw samples before
    decoding. `select` keeps only matching member names. Failures in reading or `decode` are
    skipped (see SkipCounter).
    """
    check_range("shuffle_buffer", shuffle_buffer, 0)
    urls = list_shards(shards)
    counter = SkipCounter(str(shards))
    if infinite:
        read = functools.partial(_read_urls, handler=counter, select=select)
        stages: list[Any] = [functools.partial(epoch_samples, urls, read, seed, shuffle_buffer, start)]
        decode = keep_position(decode)
    else:
        stages = [wds.SimpleShardList(urls, seed=seed if shuffle_buffer else None)]
        stages += [wds.split_by_node, wds.split_by_worker] if split else []
        stages.append(functools.partial(_read_shards, handler=counter, select=select))
        if shuffle_buffer > 1:
            stages.append(functools.partial(_worker_shuffle, bufsize=shuffle_buffer, seed=seed))
    stages += [wds.map(decode, handler=counter), counter.track]
    return wds.DataPipeline(*stages)
