"""Pre-tokenized shards: `tessera data tokenize` matches the tokenizer, the token loader matches the
image loader, the tokenizer digest is checked, and bad inputs give one-line errors."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.cli import main
from tessera.config import ConfigError
from tessera.data.loader import make_image_loader
from tessera.data.shards import read_info, sample_pipeline
from tessera.data.token_loader import check_token_shards, make_token_loader, token_shards_info
from tessera.checkpoint import state_digest
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.train.recipe import Recipe
from tessera.train.trainer import train

N, RES = 40, 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes") / "shapes"
    assert main(["data", "shapes", "--n", str(N), "--res", str(RES), "--per-shard", "16", "--out", str(folder)]) == 0
    return folder


def _save(kind: str, seed: int, folder) -> str:
    torch.manual_seed(seed)
    build_model(kind, "tiny").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return _save("vq", 0, tmp_path_factory.mktemp("vq") / "vq")


@pytest.fixture(scope="module")
def msvq_dir(tmp_path_factory):
    return _save("multiscale_vq", 0, tmp_path_factory.mktemp("msvq") / "msvq")


def _tokenize(tokenizer, shapes, out, *extra) -> int:
    return main(["data", "tokenize", "--tokenizer", str(tokenizer), "--in", str(shapes), "--out", str(out),
                 "--batch-size", "16", "--per-shard", "12", *extra])


@pytest.fixture(scope="module")
def vq_tokens(vq_dir, shapes):
    out = shapes.parent / "vq-tokens"
    assert _tokenize(vq_dir, shapes, out) == 0
    return out


@pytest.fixture(scope="module")
def msvq_tokens(msvq_dir, shapes):
    out = shapes.parent / "msvq-tokens"
    assert _tokenize(msvq_dir, shapes, out) == 0
    return out


def _raw(folder) -> dict[str, dict]:
    """Every sample's raw members by key, in shard order."""
    return {raw["__key__"]: raw for raw in sample_pipeline(folder, dict, shuffle_buffer=0, infinite=False)}


def _images(shapes) -> torch.Tensor:
    (batch,) = make_image_loader(str(shapes), N, RES, shuffle_buffer=0, infinite=False)
    return batch["image"]


@pytest.mark.parametrize("kind", ["vq", "multiscale_vq"])
def test_token_arrays_are_the_tokenizers_codes(kind, vq_dir, msvq_dir, vq_tokens, msvq_tokens, shapes):
    tokenizer_dir, out = (vq_dir, vq_tokens) if kind == "vq" else (msvq_dir, msvq_tokens)
    tokenizer = TesseraModel.from_pretrained(tokenizer_dir).eval()
    expected = tokenizer.encode(_images(shapes))
    source, written = _raw(shapes), _raw(out)
    assert list(written) == list(source), "same keys, same order"
    for i, (key, raw) in enumerate(written.items()):
        array = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
        assert array.dtype == np.uint16
        assert torch.equal(torch.from_numpy(array.astype(np.int64)), expected[i]), key
        assert all(raw[m] == source[key][m] for m in ("txt", "json"))
    info = read_info(out)
    grid = [8, 8] if kind == "vq" else [1 + 4 + 16 + 64]
    assert info["kind"] == "tokens" and info["tokenizer_kind"] == kind and info["grid"] == grid
    assert info["tokenizer_digest"] == state_digest(tokenizer.state_dict()) and len(info["tokenizer_digest"]) == 64
    assert info["vocab_size"] == 256 and info["dtype"] == "uint16" and info["count"] == N
    assert info["tokenizer"] == str(Path(tokenizer_dir).resolve()) and info["resolution"] == RES
    assert info["source_shards"] == str(shapes.resolve())
    assert info["class_names"] == read_info(shapes)["class_names"]
    assert info["keys"] == ["json", "npy", "txt"] and len(info["shards"]) == 4
    assert token_shards_info(out) == info and token_shards_info(shapes) is None
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary folders left"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_pass_yields_every_sample_once(vq_tokens, num_workers):
    batches = list(make_token_loader(vq_tokens, 16, num_workers=num_workers, infinite=False))
    tokens = torch.cat([b["tokens"] for b in batches])
    assert tokens.dtype == torch.int64 and tokens.shape == (N, 8, 8)
    assert sum(len(b["text"]) for b in batches) == N and all(b["class"].eq(-1).all() for b in batches)
    expected = sorted(json.dumps(json.loads(raw["json"])) for raw in _raw(vq_tokens).values())
    assert sorted(json.dumps(m) for b in batches for m in b["meta"]) == expected


def test_infinite_loader_resamples(vq_tokens):
    loader = iter(make_token_loader(vq_tokens, 16, seed=1, shuffle_buffer=8))
    batches = [next(loader) for _ in range(4)]  # 64 samples from 40: a second epoch
    assert all(b["tokens"].shape == (16, 8, 8) for b in batches)


def _same_loss(model, images: torch.Tensor, tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    from_images, _ = model.loss({"image": images})
    torch.manual_seed(0)
    from_tokens, _ = model.loss({"tokens": tokens})
    assert torch.equal(from_images, from_tokens)


def test_generators_give_the_same_loss_on_tokens_as_on_images(vq_dir, msvq_dir, vq_tokens, msvq_tokens, shapes):
    images = _images(shapes)
    torch.manual_seed(0)
    next_token = build_model("next_token", "tiny", tokenizer=vq_dir, cond="none").eval()
    (batch,) = make_token_loader(vq_tokens, N, shuffle_buffer=0, infinite=False)
    _same_loss(next_token, images, batch["tokens"])
    torch.manual_seed(0)
    next_scale = build_model("next_scale", "tiny", tokenizer=msvq_dir, cond="none").eval()
    (batch,) = make_token_loader(msvq_tokens, N, shuffle_buffer=0, infinite=False)
    _same_loss(next_scale, images, batch["tokens"])


def test_check_token_shards_names_a_tokenizer_mismatch(vq_dir, vq_tokens, shapes, tmp_path):
    check_token_shards(vq_tokens, TesseraModel.from_pretrained(vq_dir))
    check_token_shards(vq_tokens, vq_dir)
    other = _save("vq", 1, tmp_path / "other-vq")
    with pytest.raises(ConfigError, match=r"tokenized by the vq tokenizer .*vq \(digest \w{12}\), not by this vq "
                                          r"tokenizer \(digest \w{12}\)") as err:
        check_token_shards(vq_tokens, TesseraModel.from_pretrained(other))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="holds no pre-tokenized shards"):
        check_token_shards(shapes, vq_dir)
    with pytest.raises(ConfigError, match="holds no pre-tokenized shards"):
        make_token_loader(shapes, 4)


def _error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera: error: ") and "\n" not in err
    return err


def test_bad_inputs_give_one_line_errors(vq_dir, vq_tokens, shapes, audio_shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert "is not a folder of image shards" in _error(capsys, _tokenize(vq_dir, tmp_path / "missing", out))
    assert "already holds token shards" in _error(capsys, _tokenize(vq_dir, vq_tokens, out))
    assert "holds audio shards" in _error(capsys, _tokenize(vq_dir, audio_shards, out))
    assert "exists; give a new folder" in _error(capsys, _tokenize(vq_dir, shapes, vq_tokens))
    assert "checkpoint not found" in _error(capsys, _tokenize(tmp_path / "nope", shapes, out))
    generator = tmp_path / "gen"
    build_model("next_token", "tiny", tokenizer=vq_dir).save_pretrained(generator)
    assert "holds a 'next_token' model, not an image tokenizer" in _error(capsys, _tokenize(generator, shapes, out))
    codec = _save("audio_codec", 0, tmp_path / "codec")
    assert "holds an audio codec" in _error(capsys, _tokenize(codec, shapes, out))
    assert "--resolution 30 does not fit" in _error(capsys, _tokenize(vq_dir, shapes, out, "--resolution", "30"))
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(capsys, _tokenize(vq_dir, shapes, out, "--device", "cuda"))
    assert "--batch-size must be at least 1" in _error(capsys, _tokenize(vq_dir, shapes, out, "--batch-size", "0"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_trainer_reads_token_shards_and_reports_throughput(vq_dir, vq_tokens, tmp_path):
    """`tessera train` on pre-tokenized shards: the generator never sees pixels, the log carries
    samples/s, tokens/s and model TFLOP/s; shards of another tokenizer are refused."""
    recipe = Recipe.from_dict({
        "model": {"kind": "next_token", "preset": "tiny", "config": {"tokenizer": vq_dir, "cond": "none",
                                                                      "image_size": 32}},
        "data": {"shards": str(vq_tokens), "shuffle_buffer": 4},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1, "ckpt_every": 3, "sample_every": 0},
        "out": str(tmp_path / "run")})
    metrics = train(recipe, progress=False)
    assert metrics["step"] == 3 and metrics["samples_per_s"] > 0 and metrics["tflops_per_s"] > 0
    assert metrics["tokens_per_s"] == pytest.approx(metrics["samples_per_s"] * 64)
    assert "mfu" not in metrics  # no stated peak on a CPU
    other = _save("vq", 1, tmp_path / "other_vq")
    with pytest.raises(ConfigError, match="tokenized by"):
        train(recipe.with_overrides([f"model.config.tokenizer={other}", f"out={tmp_path / 'run2'}"]), progress=False)
