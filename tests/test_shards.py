"""Shard writing (atomic, dataset.json) and reading (batches, splitting, resampling, corrupt data)."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.config import ConfigError
from tessera.data.loader import image_to_tensor, iter_captions, make_image_loader, read_class_names
from tessera.data.shards import (CorruptDataWarning, DatasetInfo, DatasetWriter, list_shards, read_info,
                                 sample_pipeline, to_rgb)

N = 10


def _image(i: int, mode: str = "RGB", size: int = 8) -> Image.Image:
    return Image.new(mode, (size, size), (i * 20, 255 - i * 20, 7) if mode == "RGB" else i * 20)


def _write(out, n=N, per_shard=4, mode="RGB", classes=True, size=8):
    info = DatasetInfo(name="toy", source="test", license="CC0", resolution=size,
                       class_names=["even", "odd"] if classes else None)
    with DatasetWriter(out, info, prefix="toy", per_shard=per_shard) as writer:
        for i in range(n):
            writer.write(f"{i:04d}", _image(i, mode, size), f"caption {i}", {"i": i}, cls=i % 2 if classes else None)
    return writer.info


@pytest.fixture()
def toy(tmp_path):
    _write(tmp_path / "toy")
    return str(tmp_path / "toy")


def test_writer_layout_and_dataset_json(toy, tmp_path):
    info = read_info(toy)
    assert info["count"] == N and info["shards"] == ["toy-000000.tar", "toy-000001.tar", "toy-000002.tar"]
    assert info["keys"] == ["cls", "json", "png", "txt"] and info["class_names"] == ["even", "odd"]
    assert [p.rsplit("/", 1)[1] for p in list_shards(toy)] == info["shards"]
    with tarfile.open(list_shards(toy)[0]) as tar:
        assert tar.getnames()[:4] == ["0000.cls", "0000.json", "0000.png", "0000.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"], "no temporary folders left behind"


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(tmp_path / "out", DatasetInfo("x", "test", "CC0", 8)) as writer:
            writer.write("0", _image(0), "a", {})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="no samples"):
        with DatasetWriter(tmp_path / "out", DatasetInfo("x", "test", "CC0", 8)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_a_dataset_but_not_other_folders(toy, tmp_path):
    _write(toy, n=3)
    assert read_info(toy)["count"] == 3 and len(list_shards(toy)) == 1
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a dataset folder"):
        DatasetWriter(other, DatasetInfo("x", "test", "CC0", 8))
    assert (other / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_no_shards_is_one_clear_error(tmp_path, make):
    folder = tmp_path / "nothing"
    if make == "empty":
        folder.mkdir()
    with pytest.raises(FileNotFoundError, match=str(folder)):
        make_image_loader(str(folder), 2, 8)


def test_batches_have_the_documented_format(toy):
    batches = list(make_image_loader(toy, 4, 16, infinite=False, shuffle_buffer=0))
    assert [len(b["text"]) for b in batches] == [4, 4, 2]
    batch = batches[0]
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["text"] == [f"caption {i}" for i in range(4)]
    assert batch["class"].dtype == torch.int64 and batch["class"].tolist() == [0, 1, 0, 1]
    assert batch["meta"] == [{"i": i} for i in range(4)]
    assert read_class_names(toy) == ["even", "odd"]
    assert list(iter_captions(toy)) == [f"caption {i}" for i in range(N)]


def test_grayscale_becomes_rgb_and_no_class_is_minus_one(tmp_path):
    _write(tmp_path / "gray", n=3, mode="L", classes=False, size=8)
    batch = next(iter(make_image_loader(str(tmp_path / "gray"), 3, 8, infinite=False, shuffle_buffer=0)))
    image = batch["image"]
    assert image.shape == (3, 3, 8, 8) and torch.equal(image[:, 0], image[:, 2])
    assert image[1, 0, 0, 0].item() == pytest.approx(20 / 127.5 - 1)
    assert batch["class"].tolist() == [-1, -1, -1] and read_class_names(tmp_path / "gray") is None


def test_image_to_tensor_crops_resizes_and_flattens_alpha():
    rgba = Image.new("RGBA", (12, 8), (255, 0, 0, 0))
    x = image_to_tensor(rgba, 4)
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.ones_like(x))  # transparent -> white
    assert np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 255)))).tolist() == [[[0, 0, 0]] * 2] * 2


def test_finite_pass_shuffles_by_seed_and_sees_everything_once(toy):
    def keys(seed):
        return [m["i"] for b in make_image_loader(toy, 3, 8, infinite=False, seed=seed, shuffle_buffer=5)
                for m in b["meta"]]
    assert sorted(keys(0)) == list(range(N)) and keys(0) == keys(0) and keys(0) != keys(1)


def test_infinite_resamples_deterministically(toy):
    def first(seed, n=8):
        it = iter(make_image_loader(toy, 5, 8, seed=seed, shuffle_buffer=4))
        return [m["i"] for _ in range(n) for m in next(it)["meta"]]
    seen = first(0)
    assert len(seen) == 40 > N and set(seen) == set(range(N))
    assert first(0) == seen and first(1) != seen


def test_split_by_rank_is_disjoint_and_complete(toy, monkeypatch):
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append({m["i"] for b in make_image_loader(toy, 4, 8, infinite=False) for m in b["meta"]})
    assert parts[0] and parts[1] and not parts[0] & parts[1] and parts[0] | parts[1] == set(range(N))


def test_dataloader_workers_split_shards(toy):
    loader = make_image_loader(toy, 2, 8, infinite=False, num_workers=2)
    assert sorted(m["i"] for b in loader for m in b["meta"]) == list(range(N))


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(toy):
    shard = list_shards(toy)[0]
    png = io.BytesIO()
    _image(1).save(png, format="PNG")
    good = [("g1.png", png.getvalue()), ("g1.txt", b"good"), ("g1.json", b"{}")]
    bad_png = [("b1.png", b"not a png at all"), ("b1.txt", b"bad png"), ("b1.json", b"{}")]
    bad_json = [("b2.png", png.getvalue()), ("b2.txt", b"bad json"), ("b2.json", b"{nope")]
    no_png = [("b3.txt", b"no image"), ("b3.json", b"{}")]
    Path(shard).write_bytes(_tar_bytes(bad_png + good + bad_json + no_png))
    last = list_shards(toy)[-1]  # holds samples 8 and 9; cut it inside sample 9's png
    data = Path(last).read_bytes()
    Path(last).write_bytes(data[:data.index(b"0009.png") + 700])
    with pytest.warns(CorruptDataWarning, match=r"skipped \d+ unreadable") as record:
        texts = [t for b in make_image_loader(toy, 3, 8, infinite=False, shuffle_buffer=0) for t in b["text"]]
    assert texts == ["good"] + [f"caption {i}" for i in range(4, 9)]
    counts = [int(str(w.message).split("skipped ")[1].split()[0]) for w in record if w.category is CorruptDataWarning]
    assert max(counts) >= 4 and "end of pass" in str(record[-1].message)
    with pytest.warns(CorruptDataWarning):
        assert list(iter_captions(toy)) == ["bad png", "good", "bad json", "no image"] + [
            f"caption {i}" for i in range(4, 9)]


def test_nothing_readable_raises_instead_of_spinning(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.tar").write_bytes(_tar_bytes([(f"{i}.png", b"x") for i in range(1100)]))
    with pytest.warns(CorruptDataWarning), pytest.raises(RuntimeError, match="unreadable samples in a row"):
        next(iter(sample_pipeline(folder, lambda raw: raw["txt"], shuffle_buffer=0)))


def test_dataset_json_must_be_valid(toy):
    Path(toy, "dataset.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_class_names(toy)
    assert read_info(Path(toy, "nope")) is None
