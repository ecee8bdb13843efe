"""The default models shipped in the package, `tessera sample` without --ckpt, and `tessera export`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tessera.assets import ASSETS_DIR, DEFAULT_MODEL, SHIPPED_MODELS, shipped_model_path, shipped_models
from tessera.checkpoint import CheckpointError
from tessera.cli import main
from tessera.config import ConfigError
from tessera.export import export_checkpoint, recommended_sampling
from tessera.model_card import CARD_FILE, write_model_card
from tessera.modeling import TesseraModel
from tessera.sample import load_generator, resolve_settings
from tessera.train.trainer import train

from tiny_runs import tiny_recipe

SIZE_LIMIT_MB = 40.0


def test_every_default_model_is_shipped_within_the_size_limit():
    assert set(shipped_models()) == set(SHIPPED_MODELS)
    total = sum(f.stat().st_size for f in ASSETS_DIR.rglob("*") if f.is_file()) / 1e6
    assert total <= SIZE_LIMIT_MB, f"shipped assets take {total:.1f} MB"
    for model in SHIPPED_MODELS.values():
        card = (model.path / CARD_FILE).read_text()
        assert "## Data" in card and "tessera train --config configs/default_" in card and "steps" in card
        assert "## Metrics" in card and "(none measured)" not in card
        header = json.loads((model.path / "config.json").read_text())
        assert header["export"]["weights"] == "ema" and header["export"]["dtype"] == "float16"
        weights = load_file(str(model.path / "model.safetensors"))
        assert all(t.dtype == torch.float16 for t in weights.values() if t.is_floating_point())
        generator = load_generator(model.path, device="cpu")
        assert generator.modality == model.modality


def test_sample_without_ckpt_uses_the_default_model(tmp_path):
    out = tmp_path / "samples.png"
    assert main(["sample", "--prompt", "a red circle left of a blue square", "--n", "4", "--out", str(out)]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    size = json.loads((shipped_model_path(DEFAULT_MODEL) / "config.json").read_text())["config"]["image_size"]
    assert image.shape[0] >= 2 * size and image.std() > 10  # a 2x2 grid of real, non-blank images


def test_shipped_shapes_model_draws_what_the_prompt_asks(tmp_path):
    """The default model's samples for the README's prompt, checked by the exact shape detector."""
    from tessera.eval.shape_detector import detect
    from tessera.sample import generate
    model = load_generator(shipped_model_path("shapes-maskgit"), device="cpu")
    settings, masked = resolve_settings(model, {"seed": 0})
    images = generate(model, ["a red circle left of a blue square"], 8, settings, masked=masked)
    hits = 0
    for image in images:
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        found = {(d["color"], d["class"]): d["centre"][0] for d in detect(pixels)}
        hits += len(found) == 2 and found.get(("red", "circle"), 99) < found.get(("blue", "square"), -99)
    assert hits >= 6, f"only {hits} of 8 samples show a red circle left of a blue square"


def test_unknown_or_missing_default_model_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="unknown default model 'nope'"):
        shipped_model_path("nope")
    proc = subprocess.run([sys.executable, "-m", "tessera.cli", "sample", "--model", "nope", "--out",
                           str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    recipe = tiny_recipe(folder, kind="maskgit", train={"steps": 3, "ckpt_every": 3})
    train(recipe, progress=False)
    return Path(recipe.out)


def test_export_keeps_the_ema_weights_in_float16(trained_run, tmp_path):
    out = export_checkpoint(trained_run, tmp_path / "shipped", sampling=["cfg=2.5", "masked.steps=5"])
    source = TesseraModel.from_pretrained(trained_run, ema=True)
    shipped = TesseraModel.from_pretrained(out)
    assert not (out / "ema.safetensors").exists() and not (out / "tokenizer" / "ema.safetensors").exists()
    assert not list(out.rglob("train_state*"))
    for (name, a), (_, b) in zip(source.state_dict().items(), shipped.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    settings, masked = resolve_settings(shipped, {"top_k": 7})
    assert (settings.cfg, settings.top_k, masked.steps) == (2.5, 7, 5)  # recommended, then what the user gave


def test_export_refuses_bad_settings_and_never_leaves_a_half_folder(trained_run, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key bogus"):
        export_checkpoint(trained_run, tmp_path / "a", sampling=["bogus=1"])
    with pytest.raises(ConfigError, match="key=value"):
        recommended_sampling(["cfg"])
    assert not (tmp_path / "a").exists()
    assert main(["export", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_model_card_lists_recipes_steps_and_metrics(trained_run, tmp_path):
    out = export_checkpoint(trained_run, tmp_path / "shipped")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((trained_run / "recipe.yaml").read_text())
    report = tmp_path / "fd.json"
    report.write_text(json.dumps({"metric": "FD", "rows": [{"cfg": 3.0, "FD": 1.25}], "images": [{}] * 20}))
    card = write_model_card(out, "Tiny MaskGIT", "48 shapes scenes", [recipe], [report]).read_text()
    assert card.startswith("# Tiny MaskGIT") and "48 shapes scenes" in card
    assert f"tessera train --config {recipe.as_posix()}" in card and "3 of 3 steps" in card
    assert "- rows.0.FD: 1.25" in card and "images" not in card.split("## Metrics")[1]
