"""Base class of every tessera model (tokenizers and generators): config, presets, save/load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .checkpoint import (CONFIG_FILE, EMA_WEIGHTS_FILE, FORMAT_VERSION, WEIGHTS_FILE, CheckpointError,
                         atomic_directory, read_header, resolve_checkpoint)
from .config import Config, ConfigError


class TesseraModel(nn.Module):
    """A model with a typed config, named presets and the folder checkpoint format.

    Subclasses set `kind`, `config_class` and `presets`, implement
    `loss(batch) -> (loss, logs)`, and may name `asset_fields`: config fields holding paths
    to files or folders (a tokenizer checkpoint, a text tokenizer) that are copied into the
    checkpoint folder and resolved relative to it on load. Submodules listed in
    `frozen_submodules` are not trained and not saved in `model.safetensors`. Weights under
    `ema_follows_live` prefixes are copied, not averaged, into the EMA (e.g. a VQ codebook whose
    dead codes restart: averaging would blend a restarted code with its dead value).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[Config]]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    asset_fields: ClassVar[tuple[str, ...]] = ()
    frozen_submodules: ClassVar[tuple[str, ...]] = ()
    ema_follows_live: ClassVar[tuple[str, ...]] = ()  # key prefixes whose EMA copy tracks the live weights
    modality: ClassVar[str] = "image"
    recommended_sampling: dict[str, dict[str, Any]] = {}  # {"sampling": {...}, "masked": {...}} from config.json

    def __init__(self, config: Config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def make_config(cls, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """A validated config from a named preset (or the defaults) plus overrides; nested sections
        (e.g. `trunk`) are merged key by key, so `trunk={"dropout": 0.1}` keeps the preset's width."""
        data: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                raise ConfigError(f"unknown preset {preset!r} for {cls.kind}; presets: {', '.join(cls.presets)}")
            data = deep_merge(data, cls.presets[preset])
        return cls.config_class.from_dict(deep_merge(data, overrides or {}))

    # ----- training interface ---------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss and a dict of floats or 0-d tensors to log (read only when logged)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The training forward is the loss (so DDP/DeepSpeed wrappers see it as `forward`)."""
        return self.loss(batch)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without frozen submodules (what `model.safetensors` holds)."""
        skip = tuple(f"{name}." for name in self.frozen_submodules)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def train(self, mode: bool = True) -> "TesseraModel":
        super().train(mode)
        for name in self.frozen_submodules:
            if getattr(self, name, None) is not None:
                getattr(self, name).eval()
        return self

    # ----- checkpoint format -------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, ema_state: dict[str, torch.Tensor] | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write `config.json`, `model.safetensors` (+ `ema.safetensors`) and assets atomically."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.write_into(tmp, ema_state=ema_state, extra=extra)
        return path

    def checkpoint_config(self) -> dict[str, Any]:
        """The config as written to `config.json` (subclasses drop build-time-only fields)."""
        return self.config.to_dict()

    def write_into(self, folder: Path, ema_state: dict[str, torch.Tensor] | None = None,
                   extra: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the checkpoint files into an existing (temporary) folder; `weights` replace the
        model's own trainable state (e.g. full tensors gathered from ZeRO-3 shards)."""
        config = self.checkpoint_config()
        for field in self.asset_fields:
            source = config.get(field)
            if source:
                source = Path(source)
                if source.is_dir():
                    shutil.copytree(resolve_checkpoint(source), folder / field,
                                    ignore=shutil.ignore_patterns("train_state*", ".*"))
                else:
                    shutil.copy2(source, folder / field)
                config[field] = field
        header = {"format": FORMAT_VERSION, "kind": self.kind, "tessera_version": __version__,
                  "config": config, **(extra or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(header, indent=2))
        save_file(_contiguous(self.trainable_state_dict() if weights is None else weights), str(folder / WEIGHTS_FILE))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(folder / EMA_WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, ema: bool = True, map_location: str | torch.device = "cpu"):
        """Load a checkpoint of this class (or of any registered kind when called on the base)."""
        folder = resolve_checkpoint(path)
        header = read_header(folder)
        if cls is TesseraModel:
            from .registry import model_class
            target = model_class(header["kind"])
        else:
            target = cls
            if header["kind"] != cls.kind:
                raise CheckpointError(
                    f"{folder} holds a '{header['kind']}' model, but a '{cls.kind}' model was expected")
        config_data = dict(header["config"])
        for field in target.asset_fields:
            value = config_data.get(field)
            if value and not Path(value).is_absolute():
                config_data[field] = str(folder / value)
        model = target(target.config_class.from_dict(config_data))
        weights = folder / (EMA_WEIGHTS_FILE if ema and (folder / EMA_WEIGHTS_FILE).is_file() else WEIGHTS_FILE)
        if not weights.is_file():
            raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
        model.load_trainable_state(load_file(str(weights), device=str(map_location)), source=weights)
        model.recommended_sampling = dict(header.get("sampling", {}))  # set by `tessera export --sampling`
        return model.to(map_location)

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: Path | str = "state dict") -> None:
        """Load weights strictly (frozen submodules excepted), naming what does not match."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source} does not fit this {self.kind} model: "
                                  f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                                  f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(expected[key].shape)}")
        self.load_state_dict(state, strict=False)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` over `base`, recursing where both hold a dict."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
