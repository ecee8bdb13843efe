"""Real datasets to shards: Fashion-MNIST (Debian package) and emoji (two npm packages).

A missing source raises SourceError whose message is the exact command that installs it;
with `install=True` that command is run first.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import shlex
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..config import ConfigError
from .shapes import check_resolution
from .shards import DatasetInfo, DatasetWriter, to_rgb

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                          "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}
_SPLIT_NAMES = {"train": "train", "t10k": "test"}

NOTO_PACKAGE = "emoji-datasource-google@16.0.0"
FLUENT_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
DEFAULT_NPM_CACHE = Path("~/.cache/tessera/npm")
EMOJI_STYLES: dict[str, tuple[str, ...]] = {"noto": ("noto",), "fluent": ("fluent-3d",), "both": ("noto", "fluent-3d")}
_LICENSES = {"noto": "images Apache-2.0 (Google Noto Emoji); names and data MIT (emoji-datasource)",
             "fluent-3d": "images MIT (Microsoft Fluent Emoji, @lobehub/fluent-emoji-3d); names MIT (emoji-datasource)"}
_PACKAGES = {"noto": NOTO_PACKAGE, "fluent-3d": FLUENT_PACKAGE}
_EMOJI_JSON, _NOTO_DIR, _FLUENT_DIR = "package/emoji.json", "package/img/google/64/", "package/assets/"
_SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
_IGNORED_CODEPOINTS = {0xFE0F, 0xE007F}  # variation selector; tag-sequence terminator (absent in Fluent names)


class SourceError(ConfigError):
    """A data source that is missing or malformed; the message says how to fix it."""


def _run_install(commands: list[list[str]], cwd: Path | None = None) -> None:
    for command in commands:
        print(f"+ {shlex.join(command)}", flush=True)
        if shutil.which(command[0]) is None:
            raise SourceError(f"cannot install: `{command[0]}` is not on PATH")
        result = subprocess.run(command, cwd=cwd)
        if result.returncode != 0:
            raise SourceError(f"install command failed (exit {result.returncode}): {shlex.join(command)}")


# ---------------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 array from a gzipped IDX file with `ndim` dimensions (1: labels, 3: images)."""
    data = gzip.open(path).read()
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 8, ndim]):
        raise SourceError(f"{path} is not a uint8 IDX file with {ndim} dimension(s)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise SourceError(f"{path}: size does not match its header shape {shape}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(part: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of `part` ("train" or "t10k") from `root`."""
    images = read_idx(root / f"{part}-images-idx3-ubyte.gz", 3)
    labels = read_idx(root / f"{part}-labels-idx1-ubyte.gz", 1)
    if len(images) != len(labels) or (len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise SourceError(f"{root}: {part} images and labels do not match (or a label is out of range)")
    return images, labels


def write_fashion_mnist(out: str | Path, split: str = "train", *, root: str | Path = FASHION_MNIST_DIR,
                        install: bool = False, per_shard: int = 5000, progress: bool = False) -> dict[str, Any]:
    """Fashion-MNIST `split` (train, test or all) as 28x28 grayscale class-labelled shards in `out`."""
    if split not in FASHION_MNIST_SPLITS:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(FASHION_MNIST_SPLITS)}")
    root = Path(root)
    parts = FASHION_MNIST_SPLITS[split]
    needed = [root / f"{p}-{kind}-ubyte.gz" for p in parts for kind in ("images-idx3", "labels-idx1")]
    commands = [["apt-get", "update"], ["apt-get", "install", "-y", FASHION_MNIST_PACKAGE]]
    if install and not all(f.is_file() for f in needed):
        _run_install(commands)
    missing = [f for f in needed if not f.is_file()]
    if missing:
        raise SourceError(f"Fashion-MNIST not found ({missing[0]}); install it with: "
                          f"{' && '.join(shlex.join(c) for c in commands)}   (or add --install)")
    info = DatasetInfo(name=f"fashion-mnist-{split}", source=f"Debian {FASHION_MNIST_PACKAGE} ({root})",
                       license="MIT (Zalando SE, Fashion-MNIST)", resolution=28,
                       class_names=list(FASHION_MNIST_CLASSES),
                       description="28x28 grayscale Zalando article images; caption = class name")
    with DatasetWriter(out, info, prefix=f"fashion-mnist-{split}", per_shard=per_shard) as writer:
        for part in parts:
            images, labels = load_fashion_mnist(part, root)
            name = _SPLIT_NAMES[part]
            for i in tqdm(range(len(labels)), desc=f"fashion-mnist {name}", unit="img", disable=not progress):
                label = int(labels[i])
                cls_name = FASHION_MNIST_CLASSES[label]
                meta = {"class": cls_name, "label": label, "split": name, "index": i, "source": "fashion-mnist"}
                writer.write(f"{name}-{i:05d}", Image.fromarray(images[i], "L"), cls_name, meta, cls=label)
    return writer.info


# ---------------------------------------------------------------------------- emoji

def npm_tarball_name(spec: str) -> str:
    """File name `npm pack NAME@VERSION` writes: '@scope/name@1.0' -> 'scope-name-1.0.tgz'."""
    name, _, version = spec.rpartition("@")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_tarball(spec: str, cache: Path, install: bool) -> Path:
    """Path of the packed npm package in `cache`; with `install`, run `npm pack` there when missing."""
    path = cache / npm_tarball_name(spec)
    command = ["npm", "pack", "--loglevel=warn", spec]
    if not path.is_file() and install:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:  # no half-written tarballs
            _run_install([command], cwd=Path(tmp))
            if (Path(tmp) / path.name).is_file():
                os.replace(Path(tmp) / path.name, path)
    if not path.is_file():
        folder = shlex.quote(str(cache))
        raise SourceError(f"{spec} not found ({path}); fetch it with: mkdir -p {folder} && cd {folder} && "
                          f"{shlex.join(command)}   (or add --install)")
    return path


def read_tar_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the regular files in a (gzipped) tarball whose names satisfy `wanted`."""
    try:
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar if m.isfile() and wanted(m.name)}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SourceError(f"{path} is not a readable npm tarball ({err}); delete it and fetch it again") from None


def codepoints(text: str) -> tuple[int, ...]:
    """'1F3F4-E0067_e0062' -> (0x1F3F4, 0xE0067, 0xE0062), dropping FE0F and E007F."""
    return tuple(c for c in (int(part, 16) for part in re.split(r"[-_]", text) if part) if c not in _IGNORED_CODEPOINTS)


def emoji_records(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per image in emoji.json (base emoji and each skin variation) with its caption."""
    records = []
    for entry in entries:
        base = {"name": entry["name"], "short_names": entry.get("short_names", []),
                "category": entry.get("category"), "subcategory": entry.get("subcategory")}
        variants = [(entry["unified"], entry["image"], None)] + [
            (v["unified"], v["image"], key) for key, v in (entry.get("skin_variations") or {}).items()]
        for unified, image, tone_key in variants:
            tones = [_SKIN_TONES[t] for t in tone_key.split("-")] if tone_key else []
            caption = entry["name"].lower()
            if tones:  # CLDR style: "kiss: woman, man, light skin tone, dark skin tone"
                caption += (", " if ":" in caption else ": ") + ", ".join(f"{t} skin tone" for t in tones)
            records.append({**base, "unified": unified, "image": image, "skin_tone": ", ".join(tones) or None,
                            "caption": caption})
    return records


def _square(image: Image.Image, resolution: int) -> Image.Image:
    """RGB on white, padded to a square, resized (Lanczos) to resolution x resolution."""
    image = to_rgb(image)
    side = max(image.size)
    if image.size != (side, side):
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image if side == resolution else image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _noto_items(records: list[dict[str, Any]], files: dict[str, bytes]) -> tuple[list[tuple], int]:
    """(record, PNG bytes) for each Noto image, and how many images had no record."""
    items = [(r, files[_NOTO_DIR + r["image"]]) for r in records if _NOTO_DIR + r["image"] in files]
    return items, sum(name.startswith(_NOTO_DIR) for name in files) - len(items)


def _fluent_items(records: list[dict[str, Any]], files: dict[str, bytes]) -> tuple[list[tuple], int]:
    """(record, WEBP bytes) for each Fluent image matched by code points, and how many had no match."""
    by_code = {codepoints(r["unified"]): r for r in records}
    items, seen, unnamed = [], set(), 0
    for name in sorted(files):
        try:
            code = codepoints(Path(name).stem)
        except ValueError:  # not a code-point file name
            code = ()
        if code not in by_code:
            unnamed += 1
        elif code not in seen:  # a few emoji ship twice (with and without zero padding)
            seen.add(code)
            items.append((by_code[code], files[name]))
    return items, unnamed


def write_emoji(out: str | Path, resolution: int = 64, style: str = "both", *, cache: str | Path = DEFAULT_NPM_CACHE,
                install: bool = False, per_shard: int = 5000, progress: bool = False) -> dict[str, Any]:
    """Emoji images (Noto and/or Fluent 3D) on white at `resolution`, captioned with their
    lower-cased Unicode name (plus skin tone), in a fixed shuffled order, as shards in `out`."""
    check_resolution(resolution)
    if style not in EMOJI_STYLES:
        raise ConfigError(f"unknown emoji style {style!r}; valid: {', '.join(EMOJI_STYLES)}")
    styles = EMOJI_STYLES[style]
    cache = Path(cache).expanduser()
    noto = read_tar_members(npm_tarball(NOTO_PACKAGE, cache, install),
                            lambda n: n == _EMOJI_JSON or ("noto" in styles and n.startswith(_NOTO_DIR)))
    if _EMOJI_JSON not in noto:
        raise SourceError(f"the {NOTO_PACKAGE} tarball in {cache} has no {_EMOJI_JSON}")
    records = emoji_records(json.loads(noto[_EMOJI_JSON]))
    items, counts = [], {}
    for name in styles:
        if name == "noto":
            style_items, unnamed = _noto_items(records, noto)
        else:
            fluent = read_tar_members(npm_tarball(FLUENT_PACKAGE, cache, install),
                                      lambda n: n.startswith(_FLUENT_DIR) and n.endswith(".webp"))
            style_items, unnamed = _fluent_items(records, fluent)
        items += [(name, record, data) for record, data in style_items]
        counts[name] = {"images": len(style_items), "skipped_unnamed": unnamed}
    random.Random(0).shuffle(items)
    info = DatasetInfo(name=f"emoji-{style}{resolution}",
                       source="npm " + " + ".join(_PACKAGES[s] for s in styles) + f" (names: {NOTO_PACKAGE})",
                       license="; ".join(f"{s}: {_LICENSES[s]}" for s in styles), resolution=resolution,
                       description=f"emoji on white; caption = lower-cased Unicode name; counts {json.dumps(counts)}")
    with DatasetWriter(out, info, prefix=f"emoji-{style}", per_shard=per_shard) as writer:
        for name, record, data in tqdm(items, desc=f"emoji {style}", unit="img", disable=not progress):
            image = _square(Image.open(io.BytesIO(data)), resolution)
            meta = {k: record[k] for k in ("name", "short_names", "category", "subcategory", "unified", "skin_tone")}
            meta |= {"style": name, "source": _PACKAGES[name], "license": _LICENSES[name]}
            writer.write(f"{name}-{record['unified'].lower()}", image, record["caption"], meta)
    return writer.info
