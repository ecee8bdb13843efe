"""Real-data converters on tiny fake files laid out like the Debian and npm packages."""
import argparse
import gzip
import io
import json
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tessera.data import sources
from tessera.data.commands import register
from tessera.data.loader import make_image_loader, read_class_names
from tessera.data.shards import read_info
from tessera.data.sources import (FASHION_MNIST_CLASSES, SourceError, codepoints, npm_tarball_name, write_emoji,
                                  write_fashion_mnist)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", 6), ("t10k", 4)):
        images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 251
        _idx(root / f"{part}-images-idx3-ubyte.gz", images)
        _idx(root / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def _cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_fashion_mnist_to_shards(tmp_path):
    root = _fake_fashion(tmp_path / "fm")
    _cli(["data", "fashion-mnist", "--root", str(root), "--out", str(tmp_path / "test"), "--split", "test"])
    info = read_info(tmp_path / "test")
    assert info["count"] == 4 and info["resolution"] == 28 and "MIT" in info["license"]
    assert read_class_names(tmp_path / "test") == list(FASHION_MNIST_CLASSES)
    batch = next(iter(make_image_loader(str(tmp_path / "test"), 4, 28, infinite=False, shuffle_buffer=0)))
    assert batch["class"].tolist() == [0, 1, 2, 3] and batch["text"] == list(FASHION_MNIST_CLASSES[:4])
    assert batch["meta"][1] == {"class": "Trouser", "label": 1, "split": "test", "index": 1, "source": "fashion-mnist"}
    expected = (np.arange(28 * 28, 2 * 28 * 28).reshape(28, 28) % 251) / 127.5 - 1
    assert np.allclose(batch["image"][1, 2].numpy(), expected, atol=1e-6)  # grayscale -> RGB, exact pixels
    assert write_fashion_mnist(tmp_path / "all", "all", root=root)["count"] == 10


def test_fashion_mnist_bad_files_are_clear_errors(tmp_path):
    root = _fake_fashion(tmp_path / "fm")
    _idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((3, 2)))
    with pytest.raises(SourceError, match="not a uint8 IDX file with 1 dimension"):
        write_fashion_mnist(tmp_path / "out", "test", root=root)
    with pytest.raises(SourceError, match="apt-get update && apt-get install -y dataset-fashion-mnist"):
        write_fashion_mnist(tmp_path / "out", "train", root=tmp_path / "missing")
    assert not (tmp_path / "out").exists()


def _fake_runner(monkeypatch, effect):
    """Replace subprocess.run (and the PATH lookup) with `effect(command, cwd)`; returns the calls."""
    calls = []

    def run(command, cwd=None):
        calls.append(command)
        effect(command, cwd)
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(sources.subprocess, "run", run)
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    return calls


def test_fashion_mnist_install_runs_apt(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    calls = _fake_runner(monkeypatch, lambda cmd, cwd: _fake_fashion(root) if "install" in cmd else None)
    assert write_fashion_mnist(tmp_path / "out", "train", root=root, install=True)["count"] == 6
    assert calls == [["apt-get", "update"], ["apt-get", "install", "-y", "dataset-fashion-mnist"]]


def _png_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _emoji_image(size: tuple[int, int], rgb: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (size[0] // 2, size[1] // 2), (*rgb, 255)), (size[0] // 4, size[1] // 4))
    return image


def _tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


EMOJI_JSON = [
    {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple"],
     "category": "Food & Drink", "subcategory": "food-fruit"},
    {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "short_names": ["wave"],
     "category": "People & Body", "subcategory": "hand-fingers-open",
     "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png"}}},
]


def _fake_npm(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    noto = {"package/emoji.json": json.dumps(EMOJI_JSON).encode(), "package/img/google/sheets/64.png": b"sheet"}
    for name in ("1f34e", "1f44b", "1f44b-1f3fb"):
        noto[f"package/img/google/64/{name}.png"] = _png_bytes(_emoji_image((64, 64), (200, 0, 0)), "PNG")
    _tgz(cache / "emoji-datasource-google-16.0.0.tgz", noto)
    fluent = {f"package/assets/{name}.webp": _png_bytes(_emoji_image((256, 264), (0, 0, 200)), "WEBP")
              for name in ("1f34e", "01f34e", "1f44b-fe0f", "1f44b-1f3fb", "2764")}  # 01f34e: duplicate; 2764: no name
    _tgz(cache / "lobehub-fluent-emoji-3d-1.1.0.tgz", fluent | {"package/package.json": b"{}"})
    return cache


def test_emoji_to_shards(tmp_path):
    cache = _fake_npm(tmp_path / "npm")
    _cli(["data", "emoji", "--cache", str(cache), "--out", str(tmp_path / "both"), "--res", "32"])
    info = read_info(tmp_path / "both")
    assert info["count"] == 6 and info["resolution"] == 32 and info["class_names"] is None
    assert '"fluent-3d": {"images": 3, "skipped_unnamed": 1}' in info["description"]
    assert "Apache-2.0" in info["license"] and "MIT" in info["license"]
    batch = next(iter(make_image_loader(str(tmp_path / "both"), 6, 32, infinite=False, shuffle_buffer=0)))
    pairs = sorted((m["style"], t) for m, t in zip(batch["meta"], batch["text"], strict=True))
    assert pairs == [(style, text) for style in ("fluent-3d", "noto") for text in
                     ("red apple", "waving hand sign", "waving hand sign: light skin tone")]
    meta = next(m for m in batch["meta"] if m["unified"] == "1F44B-1F3FB" and m["style"] == "noto")
    assert meta["skin_tone"] == "light" and meta["short_names"] == ["wave"] and meta["category"] == "People & Body"
    assert meta["source"] == "emoji-datasource-google@16.0.0" and "Apache-2.0" in meta["license"]
    assert batch["image"].shape == (6, 3, 32, 32)
    assert (batch["image"][:, :, 0, 0] == 1).all(), "transparent corners become white"
    assert write_emoji(tmp_path / "noto", 32, "noto", cache=cache)["count"] == 3
    # the emoji's categories label a dataset classifier for classifier FD
    from tessera.cli import main
    clf = tmp_path / "clf"
    assert main(["eval", "train-classifier", "--shards", str(tmp_path / "both"), "--label", "category", "--name",
                 "FD-emoji-classifier", "--n", "6", "--epochs", "1", "--out", str(clf)]) == 0
    assert json.loads((clf / "config.json").read_text())["config"]["num_classes"] == 2


def test_emoji_missing_package_and_install(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="npm pack --loglevel=warn emoji-datasource-google@16.0.0"):
        write_emoji(tmp_path / "out", style="noto", cache=tmp_path / "empty")
    packed = _fake_npm(tmp_path / "packed")
    calls = _fake_runner(monkeypatch, lambda cmd, cwd: shutil.copy(packed / npm_tarball_name(cmd[-1]), cwd))
    assert write_emoji(tmp_path / "out", 32, "fluent", cache=tmp_path / "cache", install=True)["count"] == 3
    assert calls == [["npm", "pack", "--loglevel=warn", "emoji-datasource-google@16.0.0"],
                     ["npm", "pack", "--loglevel=warn", "@lobehub/fluent-emoji-3d@1.1.0"]]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "emoji-datasource-google-16.0.0.tgz", "lobehub-fluent-emoji-3d-1.1.0.tgz"]  # packed in a temp dir, moved


def test_code_point_matching_and_tarball_names():
    assert codepoints("0023-FE0F-20E3") == codepoints("23-fe0f-20e3") == (0x23, 0x20E3)
    assert codepoints("1F3F4-E0067-E0062-E0073-E0063-E0074-E007F") == codepoints("1f3f4-e0067_e0062_e0073_e0063_e0074")
    assert npm_tarball_name("@lobehub/fluent-emoji-3d@1.1.0") == "lobehub-fluent-emoji-3d-1.1.0.tgz"
    assert npm_tarball_name("emoji-datasource-google@16.0.0") == "emoji-datasource-google-16.0.0.tgz"
