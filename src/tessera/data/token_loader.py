"""The training batch loader over pre-tokenized shards (made by `tessera data tokenize`)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import webdataset as wds

from ..checkpoint import state_digest
from ..config import ConfigError, check_range
from ..modeling import TesseraModel
from .epochs import StreamStart, batch_position
from .loader import worker_loader
from .shards import read_info, sample_pipeline
from .tokenize import TOKEN_MEMBER, TOKENS_KIND


def token_shards_info(shards: str | Path) -> dict[str, Any] | None:
    """The folder's dataset.json when it describes pre-tokenized shards (kind "tokens"), else None."""
    info = read_info(shards)
    return info if info is not None and info.get("kind") == TOKENS_KIND else None


def _require_token_shards(shards: str | Path) -> dict[str, Any]:
    info = token_shards_info(shards)
    if info is None:
        raise ConfigError(f"{shards} holds no pre-tokenized shards (its dataset.json lacks kind: {TOKENS_KIND}); "
                          f"make them with `tessera data tokenize`")
    return info


def check_token_shards(shards: str | Path, tokenizer: TesseraModel | str | Path) -> None:
    """Raise a one-line ConfigError unless `shards` were tokenized by these very tokenizer weights
    (a loaded tokenizer, before any dtype cast, or its checkpoint folder)."""
    info = _require_token_shards(shards)
    if not isinstance(tokenizer, TesseraModel):
        tokenizer = TesseraModel.from_pretrained(tokenizer)
    digest = state_digest(tokenizer.state_dict())
    if digest != info.get("tokenizer_digest"):
        raise ConfigError(f"{shards} was tokenized by the {info.get('tokenizer_kind')} tokenizer "
                          f"{info.get('tokenizer')} (digest {str(info.get('tokenizer_digest'))[:12]}), not by this "
                          f"{tokenizer.kind} tokenizer (digest {digest[:12]}); re-run `tessera data tokenize`")


def decode_token_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """{"tokens": int64 array, "text", "class" (-1 when absent), "meta"} from the npy/txt/json(/cls)
    members; a missing or unreadable member raises."""
    tokens = np.load(io.BytesIO(raw[TOKEN_MEMBER]), allow_pickle=False)
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json member is a {type(meta).__name__}, not an object")
    return {"tokens": tokens.astype(np.int64), "text": raw["txt"].decode("utf-8"),
            "class": int(raw["cls"]) if "cls" in raw else -1, "meta": meta}


def collate_tokens(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into a batch dict (tokens, text, class, meta)."""
    return {"tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples])),
            "text": [s["text"] for s in samples],
            "class": torch.tensor([s["class"] for s in samples], dtype=torch.int64),
            "meta": [s["meta"] for s in samples]}


def make_token_loader(shards: str | Path, batch_size: int, *, num_workers: int = 0, seed: int = 0,
                      shuffle_buffer: int = 1000, infinite: bool = True, start: StreamStart | None = None
                      ) -> Iterable[dict]:
    """Batches `{"tokens": (B, *grid) int64, "text": list[str], "class": (B,) int64 (-1 where a
    sample has no class), "meta": list[dict]}` from the pre-tokenized shard folder `shards`.

    Epochs, splitting, shuffling, stream positions and `start` are those of `make_image_loader`.
    """
    check_range("batch_size", batch_size, 1)
    check_range("num_workers", num_workers, 0)
    _require_token_shards(shards)
    pipeline = sample_pipeline(shards, decode_token_sample, seed=seed, shuffle_buffer=shuffle_buffer,
                               infinite=infinite, start=start)
    pipeline.append(wds.batched(batch_size, collation_fn=batch_position(collate_tokens), partial=not infinite))
    return worker_loader(pipeline, num_workers, infinite)
