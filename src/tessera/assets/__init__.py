"""The default models shipped inside the package (`tessera sample` and `tessera demo` use them).

Each lives in `src/tessera/assets/<name>/` as an ordinary checkpoint folder (`config.json`,
`model.safetensors` holding the EMA weights in float16, the tokenizer folder inside it) with a
`MODEL_CARD.md` (data, recipe command, steps, metrics). `tessera export` writes such folders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CONFIG_FILE, CheckpointError

ASSETS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedModel:
    """One default model: its name, what it makes and an example prompt."""

    name: str
    modality: str  # "image" or "audio"
    title: str
    example_prompt: str

    @property
    def path(self) -> Path:
        return ASSETS_DIR / self.name

    @property
    def present(self) -> bool:
        return (self.path / CONFIG_FILE).is_file()


SHIPPED_MODELS: dict[str, ShippedModel] = {m.name: m for m in (  # the default first (the demo lists them so)
    ShippedModel("shapes-maskgit", "image", "Shapes, MaskGIT over a VQ", "a red circle left of a blue square"),
    ShippedModel("shapes-var", "image", "Shapes, next-scale (VAR) over a multi-scale residual VQ",
                 "three yellow stars"),
    ShippedModel("emoji", "image", "Emoji, text-to-image next-token over a VQ", "red apple"),
    ShippedModel("audio-magnet", "audio", "Speech and instrument notes, MAGNeT over a 4-codebook audio codec",
                 "instrument note, Cello, strings family: A3, velocity 100, held 1.0 s"),
)}
DEFAULT_MODEL = "shapes-maskgit"  # the best compositional score of the shipped image models (MODEL_CARD.md)


def shipped_models() -> dict[str, ShippedModel]:
    """The shipped default models that are present in this installation, by name."""
    return {name: model for name, model in SHIPPED_MODELS.items() if model.present}


def shipped_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The checkpoint folder of a shipped default model; a clear error names the known ones."""
    if name not in SHIPPED_MODELS:
        raise CheckpointError(f"unknown default model {name!r}; shipped models: {', '.join(SHIPPED_MODELS)}")
    model = SHIPPED_MODELS[name]
    if not model.present:
        raise CheckpointError(f"the default model {name!r} is missing from this installation ({model.path}); "
                              "reinstall tessera or give --ckpt")
    return model.path
