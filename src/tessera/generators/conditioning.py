"""Condition embeddings as prefix tokens: class labels or captions, each with a learned null."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError


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
        ids = self.tokenizer.encode_batch(list(texts), self.length).to(self.null.device)
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


def condition_size(cond) -> int:
    """Batch size of a condition (labels tensor, list of prompts, or an int)."""
    return cond if isinstance(cond, int) else len(cond)
