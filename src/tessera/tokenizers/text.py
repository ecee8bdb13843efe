"""Caption tokenizer: a small lower-cased BPE trained on the dataset's captions, saved as HF `tokenizer.json`."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Captions -> fixed-length id tensors (`[BOS] text [EOS]`, truncated, right-padded with `pad_id`)."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with train_text_tokenizer")
        self.tokenizer = tokenizer
        self._max_len: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Read a `tokenizer.json` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception for bad JSON or schema
            raise ValueError(f"{path} is not a HF tokenizers JSON file: {str(err).splitlines()[0]}") from None
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id(PAD)

    def encode_batch(self, texts: list[str], max_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, max_len) int64 ids on `device`: `[BOS] text [EOS]`, truncated to `max_len` (specials kept),
        padded. To a GPU they go from pinned memory, so the copy does not wait for the GPU's queue to drain."""
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for [BOS] and [EOS]; use max_len >= 2")
        if max_len != self._max_len:
            self.tokenizer.enable_truncation(max_length=max_len)
            self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=max_len)
            self._max_len = max_len
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).view(len(texts), max_len)
        if torch.device(device).type == "cuda":
            return ids.pin_memory().to(device, non_blocking=True)
        return ids.to(device)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids (list or 1-D tensor) -> text, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, out_path: str | Path) -> TextTokenizer:
    """Train a lower-cased BPE on `captions`, write it to `out_path` (tokenizer.json format) atomically."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save(str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return TextTokenizer.load(out_path)
