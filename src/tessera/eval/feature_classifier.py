"""A compact CNN trained on a dataset's own labels, whose pooled penultimate layer gives the
features of a dataset-specific Fréchet distance ("FD-<dataset>-classifier"), for data far from
ImageNet (Fashion-MNIST, procedural shapes). Saved as a folder with `config.json` (holding a weights
digest) + `model.safetensors`; trained by `tessera eval train-classifier`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, atomic_directory, state_digest
from .backbones import _batched_features, _resize, as_rgb_float, check_images, check_state_dict, read_state_dict

CLASSIFIER_KIND = "fd_feature_classifier"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a `FeatureClassifier`."""

    name: str
    num_classes: int
    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.image_size < 1 or not self.widths or min(self.widths) < 1:
            raise ValueError(f"invalid classifier shape: {self}")


class FeatureClassifier(nn.Module):
    """Conv stages (3x3 conv, GroupNorm, ReLU, 2x2 pool) -> global average pool (the features) -> linear."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.name, self.dim = config.name, config.widths[-1]
        layers: list[nn.Module] = []
        cin = 3
        for i, width in enumerate(config.widths):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.ReLU()]
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = width
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(self.dim, config.num_classes)
        self.digest = ""
        self.train_accuracy: float | None = None

    @property
    def tag(self) -> str:
        """Name plus a short weights digest, for reports."""
        return f"{self.name}@{self.digest[:8]}"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 255] -> [B, dim] pooled penultimate features."""
        x = _resize(x, self.config.image_size) / 127.5 - 1.0
        return self.trunk(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 255] -> class logits."""
        return self.head(self.embed(x))

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 [B, 1|3, H, W] -> float32 [B, dim] on the CPU."""
        return _batched_features(self, images, batch_size)

    def save(self, path: str | Path) -> Path:
        """Write `config.json` (with the weights digest) + `model.safetensors` into folder `path`, atomically."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        self.digest = state_digest(state)
        header = {"kind": CLASSIFIER_KIND, "config": dataclasses.asdict(self.config), "sha256": self.digest,
                  "train_accuracy": self.train_accuracy}
        with atomic_directory(path) as tmp:
            save_file(state, tmp / WEIGHTS_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2))
        return Path(path)


def _check_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Validate labels against the image batch; return them as a long tensor."""
    check_images(images)
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be {images.shape[0]} integers, got shape {tuple(labels.shape)} "
                         f"dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    return labels.long()


def train_feature_classifier(images: torch.Tensor, labels: torch.Tensor | Sequence[int], *,
                             name: str = "FD-classifier", num_classes: int | None = None,
                             image_size: int = 32, widths: Sequence[int] = (32, 64, 128), epochs: int = 10,
                             batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                             device: str | torch.device = "cpu", out: str | Path | None = None) -> FeatureClassifier:
    """Train a `FeatureClassifier` on uint8 images and their class labels (AdamW, one-cycle LR);
    returns it in eval mode with `train_accuracy` set, and saves it to folder `out` if given."""
    labels = _check_labels(images, labels)
    num_classes = num_classes or int(labels.max()) + 1
    if int(labels.max()) >= num_classes or num_classes < 2:
        raise ValueError(f"need 2+ classes and labels below num_classes={num_classes}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be at least 1")
    torch.manual_seed(seed)
    model = FeatureClassifier(ClassifierConfig(name, num_classes, image_size, tuple(widths))).to(device)
    steps = epochs * -(-images.shape[0] // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(images.shape[0], generator=gen).split(batch_size):
            x, y = as_rgb_float(images[idx].to(device)), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    model.train_accuracy = classifier_accuracy(model, images, labels)
    model.digest = state_digest(model.state_dict())
    if out is not None:
        model.save(out)
    return model


def classifier_accuracy(model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on uint8 images."""
    logits = model.head(model.features(images).to(model.head.weight.device)).cpu()
    return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())


def _read_classifier_header(path: Path) -> tuple[dict, ClassifierConfig]:
    """The parsed `config.json` of a classifier folder and its `ClassifierConfig`."""
    try:
        header = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    kind = header.get("kind") if isinstance(header, dict) else None
    if kind != CLASSIFIER_KIND:
        raise CheckpointError(f"{path} describes a '{kind}', not a {CLASSIFIER_KIND}")
    try:
        config = ClassifierConfig(**dict(header["config"], widths=tuple(header["config"]["widths"])))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has an invalid classifier config ({type(err).__name__}: {err})") from None
    return header, config


def load_feature_classifier(path: str | Path, device: str | torch.device = "cpu") -> FeatureClassifier:
    """A classifier saved by `FeatureClassifier.save`, checked against its config and digest."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is not a feature-classifier folder (needs {CONFIG_FILE} + {WEIGHTS_FILE})")
    header, config = _read_classifier_header(path / CONFIG_FILE)
    model = FeatureClassifier(config)
    state = read_state_dict(path / WEIGHTS_FILE)
    check_state_dict(model, state, path / WEIGHTS_FILE)
    digest = state_digest(state)
    if digest != header.get("sha256"):
        raise CheckpointError(f"{path}: weights digest {digest[:12]} does not match config "
                              f"{str(header.get('sha256'))[:12]} (file changed after saving)")
    model.load_state_dict(state, strict=True)
    model.digest, model.train_accuracy = digest, header.get("train_accuracy")
    return model.to(device).eval()
