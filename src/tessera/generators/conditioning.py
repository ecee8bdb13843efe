"""Condition embeddings as prefix tokens: class labels or captions, each with a learned null."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import Config, ConfigError, check_range


@dataclass
class ConditionedConfig(Config):
    """The condition fields every generator config shares (class, caption or none; CFG dropout)."""

    cond: Literal["class", "text", "none"] = "class"
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)
    text_tokenizer: str = ""  # tokenizer.json of the caption tokenizer (cond=text)
    text_len: int = 16
    cond_drop: float = 0.1  # condition dropout for classifier-free guidance
    label_smoothing: float = 0.0

    def validate(self) -> None:
        super().validate()  # cooperative: mixins such as FusedLossConfig validate their fields too
        check_range("cond_drop", self.cond_drop, 0.0, 1.0)
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_range("num_classes", self.num_classes, 1)
        if self.cond == "text" and not self.text_tokenizer:
            raise ConfigError("cond=text needs text_tokenizer (a tokenizer.json trained on the captions)")

    def make_prefix(self, dim: int) -> nn.Module:
        """The condition module these fields describe."""
        return build_prefix(self.cond, dim, num_classes=self.num_classes, class_names=self.class_names,
                            text_tokenizer=self.text_tokenizer, text_len=self.text_len)


class ClassPrefix(nn.Module):
    """One token per sample from a class table whose last row is the null (unconditional) class."""

    length = 1

    def __init__(self, num_classes: int, dim: int, class_names: list[str]):
        super().__init__()
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)[:, None]

    def parse(self, values: list[str] | None, n: int) -> torch.Tensor:
        """Class names or indices -> (n,) labels, cycling through `values` (all classes if None)."""
        if not values:
            return torch.arange(n) % self.num_classes
        labels = []
        for value in values:
            if value.isdigit() and int(value) < self.num_classes:
                labels.append(int(value))
            elif value in self.class_names:
                labels.append(self.class_names.index(value))
            else:
                known = ", ".join(self.class_names) or f"0..{self.num_classes - 1}"
                raise ConfigError(f"unknown class {value!r}; this model knows: {known}")
        return torch.tensor(labels)[torch.arange(n) % len(labels)]


class TextPrefix(nn.Module):
    """`length` caption tokens (padded) with learned positions; the null caption is learned too."""

    def __init__(self, tokenizer, length: int, dim: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.length = length
        self.table = nn.Embedding(tokenizer.vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.null = nn.Parameter(torch.randn(length, dim) * 0.02)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, texts: list[str], drop: torch.Tensor) -> torch.Tensor:
        ids = self.tokenizer.encode_batch(list(texts), self.length, self.null.device)
        emb = self.table(ids) + self.positions
        return torch.where(drop[:, None, None], self.null.expand_as(emb).to(emb.dtype), emb)

    def parse(self, values: list[str] | None, n: int) -> list[str]:
        if not values:
            raise ConfigError("this model is text-conditional: give a prompt (e.g. --prompt \"a red circle\")")
        return [values[i % len(values)] for i in range(n)]


class NullPrefix(nn.Module):
    """Unconditional models: a single learned start token."""

    length = 1

    def __init__(self, dim: int):
        super().__init__()
        self.start = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, batch_size: int, drop: torch.Tensor) -> torch.Tensor:
        return self.start.expand(drop.shape[0], -1, -1)

    def parse(self, values: list[str] | None, n: int) -> int:
        if values:
            raise ConfigError("this model is unconditional; it takes no prompt or class")
        return n


def build_prefix(cond: str, dim: int, *, num_classes: int = 0, class_names: list[str] | None = None,
                 text_tokenizer: str = "", text_len: int = 16) -> nn.Module:
    """The condition module for `cond` in ("class", "text", "none")."""
    if cond == "class":
        return ClassPrefix(num_classes, dim, list(class_names or []))
    if cond == "text":
        from ..tokenizers.text import TextTokenizer
        return TextPrefix(TextTokenizer.load(text_tokenizer), text_len, dim)
    return NullPrefix(dim)


def condition_size(cond) -> int:
    """Batch size of a condition (labels tensor, list of prompts, or an int)."""
    return cond if isinstance(cond, int) else len(cond)
