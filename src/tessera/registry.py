"""Name -> model class registry. The CLI, trainer and tests build models only through it."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from .modeling import TesseraModel

# kind -> "module:Class"; imported lazily so `tessera --help` stays fast.
MODEL_CLASSES: dict[str, str] = {
    "vq": "tessera.tokenizers.vq:VQTokenizer",
    "multiscale_vq": "tessera.tokenizers.multiscale:MultiScaleVQ",
    "kl": "tessera.tokenizers.continuous:KLAutoencoder",
    "audio_codec": "tessera.tokenizers.audio:AudioCodec",
    "next_token": "tessera.generators.next_token:NextTokenGenerator",
    "next_scale": "tessera.generators.next_scale:NextScaleGenerator",
    "flow_ar": "tessera.generators.flow_ar:FlowARGenerator",
    "maskgit": "tessera.generators.masked:MaskGITGenerator",
    "magnet": "tessera.generators.masked:MAGNeTGenerator",
    "next_token_streams": "tessera.generators.multistream:StreamNextTokenGenerator",
}


def model_class(kind: str) -> type["TesseraModel"]:
    """The class registered under `kind`; a clear error lists the known kinds."""
    if kind not in MODEL_CLASSES:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_CLASSES)}")
    module_name, class_name = MODEL_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(kind: str, preset: str | None = None, **overrides) -> "TesseraModel":
    """Build a fresh model of `kind` from a named preset plus field overrides."""
    cls = model_class(kind)
    return cls(cls.make_config(preset, overrides))
