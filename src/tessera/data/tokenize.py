"""Pre-tokenized shards: encode an image shard folder once with a frozen tokenizer.

Each output sample holds `KEY.npy` (the token array, uint16 when the vocabulary fits, else
uint32) and the source's `KEY.txt`, `KEY.json` (and `KEY.cls`) unchanged. `dataset.json`
records `kind: "tokens"` and which tokenizer made the tokens (kind, weights digest, grid,
vocabulary), so a generator can refuse tokens from another tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from ..checkpoint import read_header, state_digest
from ..config import ConfigError, check_range
from ..modeling import TesseraModel
from .loader import image_to_tensor
from .shards import DatasetInfo, DatasetWriter, decode_sample, read_info, sample_pipeline

TOKENS_KIND = "tokens"
TOKEN_MEMBER = "npy"
IMAGE_TOKENIZERS = ("vq", "multiscale_vq")
_PASSED_THROUGH = ("txt", "json", "cls")


@dataclasses.dataclass
class TokenDatasetInfo(DatasetInfo):
    """dataset.json of pre-tokenized shards: the image dataset's fields plus what made the tokens."""

    kind: str = TOKENS_KIND
    tokenizer: str = ""  # the tokenizer folder (absolute path)
    tokenizer_kind: str = ""
    tokenizer_digest: str = ""  # `state_digest` of the loaded tokenizer's state dict
    grid: list[int] = dataclasses.field(default_factory=list)  # one sample's token array shape
    vocab_size: int = 0
    dtype: str = ""
    source_shards: str = ""


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype of token ids below `vocab_size`: uint16 up to 65536 codes, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def load_image_tokenizer(path: str | Path) -> TesseraModel:
    """The image tokenizer in checkpoint folder `path` (EMA weights when saved), frozen, in eval mode on
    the CPU; any other kind of model is a one-line ConfigError."""
    kind = read_header(path)["kind"]
    if kind == "audio_codec":
        raise ConfigError(f"{path} holds an audio codec: `tessera data tokenize` encodes image shards only")
    if kind not in IMAGE_TOKENIZERS:
        raise ConfigError(f"{path} holds a '{kind}' model, not an image tokenizer ({', '.join(IMAGE_TOKENIZERS)})")
    return TesseraModel.from_pretrained(path).requires_grad_(False).eval()


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device auto or cpu")
    return chosen


def _check_source(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise ConfigError(f"--in {src} is not a folder of image shards")
    info = read_info(src) or {}
    if info.get("kind") == TOKENS_KIND:
        raise ConfigError(f"--in {src} already holds token shards; give the image shards they came from")
    if info.get("sample_rate") or "flac" in info.get("keys", []):
        raise ConfigError(f"--in {src} holds audio shards: `tessera data tokenize` encodes image shards only")
    return info


def _token_grid(tokenizer: TesseraModel, resolution: int, device: torch.device) -> list[int]:
    """Shape of one image's token array, from encoding a blank image (a bad resolution is a ConfigError)."""
    try:
        return list(tokenizer.encode(torch.zeros(1, 3, resolution, resolution, device=device)).shape[1:])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"--resolution {resolution} does not fit this {tokenizer.kind} tokenizer (trained at "
                          f"{tokenizer.config.image_size}px): {str(err).splitlines()[0]}") from None


def _decode_source(raw: dict[str, Any], resolution: int) -> dict[str, Any]:
    image = image_to_tensor(decode_sample(raw).image, resolution)
    return {"key": raw["__key__"], "image": image, "fields": {k: raw[k] for k in _PASSED_THROUGH if k in raw}}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.inference_mode()
def tokenize_shards(src: str | Path, out: str | Path, tokenizer_path: str | Path, *, batch_size: int = 256,
                    device: str = "auto", resolution: int | None = None, per_shard: int = 5000,
                    progress: bool = False) -> dict[str, Any]:
    """Encode every image of shard folder `src` (one pass, in shard order) with the tokenizer at
    `tokenizer_path` into a new shard folder `out`; returns its dataset.json contents.

    Images are prepared as the image loader does (RGB, centre crop, bicubic resize to
    `resolution`, default the tokenizer's image size) and encoded `batch_size` at a time on
    `device` ("auto": CUDA when present). `out` must not exist; it appears only when complete.
    """
    check_range("batch_size", batch_size, 1)
    check_range("per_shard", per_shard, 1)
    src, out = Path(src), Path(out)
    source = _check_source(src)
    if out.exists():
        raise ConfigError(f"--out {out} exists; give a new folder")
    run_on = _pick_device(device)
    tokenizer = load_image_tokenizer(tokenizer_path)
    digest = state_digest(tokenizer.state_dict())
    tokenizer.to(run_on)
    resolution = tokenizer.config.image_size if resolution is None else resolution
    check_range("resolution", resolution, 1)
    grid = _token_grid(tokenizer, resolution, run_on)
    dtype = token_dtype(tokenizer.vocab_size)
    info = TokenDatasetInfo(
        name=f"{source.get('name', src.name)}-tokens", source=source.get("source", str(src)),
        license=source.get("license", "unknown"), resolution=resolution, class_names=source.get("class_names"),
        description=f"{tokenizer.kind} tokens of {src} at {resolution}px",
        tokenizer=str(Path(tokenizer_path).resolve()), tokenizer_kind=tokenizer.kind, tokenizer_digest=digest,
        grid=grid, vocab_size=tokenizer.vocab_size, dtype=dtype.name, source_shards=str(src.resolve()))
    pipeline = sample_pipeline(src, functools.partial(_decode_source, resolution=resolution), shuffle_buffer=0,
                               infinite=False, split=False)
    pipeline.append(wds.batched(batch_size, collation_fn=None, partial=True))
    with DatasetWriter(out, info, prefix="tokens", per_shard=per_shard) as writer, \
            tqdm(total=source.get("count"), desc=f"tokenize {tokenizer.kind}", unit="img",
                 disable=not progress) as bar:
        for batch in pipeline:
            images = torch.stack([s["image"] for s in batch]).to(run_on)
            tokens = tokenizer.encode(images).cpu().numpy().astype(dtype)
            for sample, row in zip(batch, tokens):
                writer.write_record(sample["key"], {TOKEN_MEMBER: _npy_bytes(row), **sample["fields"]})
            bar.update(len(batch))
    return writer.info
