"""Procedural shapes: deterministic, in range, and every scene satisfies its caption exactly."""
import argparse
import json
from collections import Counter

import numpy as np
import pytest

from tessera.config import ConfigError
from tessera.data.commands import register
from tessera.data.shapes import (BACKGROUND, COLORS, NUMBER_WORDS, SHAPES, TAGS, generate_prompts,
                                 relative_position, render_scene)

N_SCENES = 240


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(i, 7, 64) for i in range(N_SCENES)]


def test_same_arguments_same_scene():
    a, b, c = render_scene(5, 3, 48), render_scene(5, 3, 48), render_scene(6, 3, 48)
    assert a[1:] == b[1:] and a[0].tobytes() == b[0].tobytes()
    assert (a[1], a[0].tobytes()) != (c[1], c[0].tobytes())
    assert render_scene(5, 4, 48)[1:] != a[1:]


def test_layout_is_resolution_independent():
    (_, cap32, meta32), (img64, cap64, meta64) = render_scene(11, 0, 32), render_scene(11, 0, 64)
    assert cap32 == cap64 and img64.size == (64, 64)
    for o32, o64 in zip(meta32["objects"], meta64["objects"], strict=True):
        assert o64["bbox"] == pytest.approx([2 * v for v in o32["bbox"]], abs=0.02)


@pytest.mark.parametrize("resolution", [16, 31, 257])
def test_resolution_out_of_range_is_an_error(resolution):
    with pytest.raises(ConfigError, match="resolution"):
        render_scene(0, 0, resolution)


@pytest.mark.parametrize("resolution", [32, 256])
def test_resolution_bounds_render(resolution):
    assert render_scene(1, 0, resolution)[0].size == (resolution, resolution)


def _matches(obj, req):
    return obj["class"] == req["class"] and req.get("color", obj["color"]) == obj["color"]


def test_scenes_satisfy_their_metadata(scenes):
    tags = Counter()
    for _, caption, meta in scenes:
        tags[meta["tag"]] += 1
        objects, res = meta["objects"], meta["resolution"]
        assert caption == meta["prompt"] and set(meta) >= {"tag", "include", "exclude", "prompt", "objects"}
        assert 1 <= len(objects) <= 4 and len(objects) == sum(r["count"] for r in meta["include"])
        for req in meta["include"]:
            assert req["class"] in SHAPES and req["class"] in caption
            assert sum(_matches(o, req) for o in objects) >= req["count"]
            if "color" in req:
                assert req["color"] in caption
        for req in meta["exclude"]:
            assert sum(_matches(o, req) for o in objects) < req["count"]
        if meta["tag"] == "counting":
            (req,) = meta["include"]
            assert NUMBER_WORDS[req["count"]] in caption and meta["exclude"] == [{"class": req["class"],
                                                                                  "count": req["count"] + 1}]
            assert all(o["class"] == req["class"] for o in objects)
        if meta["tag"] == "position":
            relation, target = meta["include"][1]["position"]
            assert relation in caption
            assert relation in relative_position(objects[1]["bbox"], objects[target]["bbox"])
        for i, a in enumerate(objects):
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= res and 0 <= y0 < y1 <= res
            assert a["center"] == pytest.approx([(x0 + x1) / 2, (y0 + y1) / 2], abs=0.01)
            assert tuple(a["rgb"]) == COLORS[a["color"]]
            for b in objects[i + 1:]:
                bx0, by0, bx1, by1 = b["bbox"]
                assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0, "objects overlap"
    assert set(tags) == set(TAGS)
    assert " a orange" not in " ".join(c for _, c, _ in scenes)


def test_pixels_match_ground_truth(scenes):
    """Object centres are exactly their palette colour; everything outside the boxes is background."""
    for image, _, meta in scenes[:60]:
        pixels = np.asarray(image)
        outside = np.ones(pixels.shape[:2], bool)
        for obj in meta["objects"]:
            cx, cy = (int(v) for v in obj["center"])
            assert tuple(pixels[cy, cx]) == COLORS[obj["color"]], (meta["prompt"], obj)
            x0, y0, x1, y1 = obj["bbox"]
            outside[max(0, int(y0) - 1):int(y1) + 2, max(0, int(x0) - 1):int(x1) + 2] = False
        assert (pixels[outside] == BACKGROUND).all()


def test_relative_position_follows_geneval():
    assert relative_position([0, 0, 10, 10], [30, 0, 40, 10]) == {"left of"}
    assert relative_position([30, 0, 40, 10], [0, 0, 10, 10]) == {"right of"}
    assert relative_position([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}
    assert relative_position([0, 0, 10, 10], [30, 30, 40, 40]) == {"left of", "above"}
    assert relative_position([0, 0, 10, 10], [1, 0, 11, 10]) == set()  # offset smaller than 0.1 * (w_a + w_b)


def test_generate_prompts_cycle_tags_deterministically():
    prompts = generate_prompts(12, seed=1)
    assert prompts == generate_prompts(12, seed=1) and prompts != generate_prompts(12, seed=2)
    assert [p["tag"] for p in prompts] == list(TAGS) * 2
    assert all(p["prompt"].startswith("a photo of ") for p in prompts)
    json.dumps(prompts)


def test_cli_shapes_writes_shards_and_rejects_bad_args(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "shapes"
    args = parser.parse_args(["data", "shapes", "--n", "12", "--res", "32", "--out", str(out), "--per-shard", "5"])
    args.func(args)
    info = json.loads((out / "dataset.json").read_text())
    assert info["count"] == 12 and len(info["shards"]) == 3 and info["resolution"] == 32
    assert "wrote 12 samples" in capsys.readouterr().out
    for flags, message in ((["--res", "16"], "--res must be between 32 and 256, got 16"),
                           (["--n", "0"], "--n must be at least 1, got 0")):
        args = parser.parse_args(["data", "shapes", "--out", str(tmp_path / "bad"), *flags])
        with pytest.raises(ConfigError, match=message):
            args.func(args)
    assert not (tmp_path / "bad").exists()
