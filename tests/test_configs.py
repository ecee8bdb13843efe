"""Every recipe in configs/ parses and its model config validates; configs round-trip."""
from pathlib import Path

import pytest

from tessera.registry import model_class
from tessera.train.recipe import Recipe

RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_valid(path):
    recipe = Recipe.from_file(path)
    cls = model_class(recipe.model.kind)
    config = cls.make_config(recipe.model.preset or None, recipe.model.config)
    assert type(config).from_dict(config.to_dict()) == config
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_overrides_reach_nested_model_fields():
    recipe = Recipe.from_file(RECIPES[0]).with_overrides(["train.steps=7", "model.config.trunk.dim=96"])
    assert recipe.train.steps == 7 and recipe.model.config["trunk"]["dim"] == 96


def test_nested_override_merges_into_the_preset():
    from tessera.registry import build_model
    model = build_model("next_token", "small", vocab_size=64, grid_size=8, trunk={"dropout": 0.1})
    assert model.config.trunk.dropout == 0.1
    assert (model.config.trunk.dim, model.config.trunk.n_layers) == (384, 8)
