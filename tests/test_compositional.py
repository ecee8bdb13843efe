"""Exactly scored GenEval-style benchmark on shapes: the prompt set, the detector and the scoring rules.

Validation that GenEval itself cannot do: ground-truth renders of every prompt score ~1 per task,
renders with one attribute wrong fail their task, noise and blank images score ~0, and mild
noise, blur and JPEG compression leave the scores of ground-truth renders near 1.
"""
import io
import json
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tessera.config import ConfigError
from tessera.data.shapes import BACKGROUND, COLORS, NUMBER_WORDS, RELATIONS, SHAPES, TAGS, render_scene
from tessera.eval.compositional import (prompt_set, render_prompt, score_detections, score_image, summarise,
                                        write_prompts)
from tessera.eval.shape_detector import detect

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def prompts():
    return prompt_set()


def _summary(prompts, images):
    return summarise([{"tag": meta["tag"], "correct": score_image(image, meta)["correct"]}
                      for meta, image in zip(prompts, images, strict=True)])


def _gt_summary(prompts, resolution, corrupt=lambda image: image):
    return _summary(prompts, [corrupt(render_prompt(meta, resolution, seed=i)) for i, meta in enumerate(prompts)])


# --- prompt set ---------------------------------------------------------------------------------------------

def test_prompt_set_size_tags_and_geneval_schema(prompts):
    tags = Counter(meta["tag"] for meta in prompts)
    assert len(prompts) >= 550 and set(tags) == set(TAGS) and min(tags.values()) >= 100
    for meta in prompts:
        assert set(meta) == {"tag", "include", "prompt"} | ({"exclude"} if meta["tag"] == "counting" else set())
        assert meta["prompt"].startswith("a photo of ")
        for req in meta["include"]:
            assert set(req) <= {"class", "count", "color", "position"} and req["class"] in SHAPES
            assert req.get("color", "red") in COLORS
            if "position" in req:
                assert req["position"][0] in RELATIONS and req["position"][1] == 0
        if meta["tag"] == "counting":
            (req,), (exc,) = meta["include"], meta["exclude"]
            assert req["count"] in NUMBER_WORDS and exc == {"class": req["class"], "count": req["count"] + 1}


def test_prompt_set_is_deterministic_and_exhaustive_where_small(prompts, tmp_path):
    assert prompt_set() == prompts and prompt_set(seed=1) != prompts
    single = Counter(meta["include"][0]["class"] for meta in prompts if meta["tag"] == "single_object")
    assert set(single) == set(SHAPES) and len(set(single.values())) == 1  # every shape, equally often
    colors = {(meta["include"][0]["class"], meta["include"][0]["color"]) for meta in prompts if meta["tag"] == "colors"}
    assert len(colors) == len(SHAPES) * len(COLORS)
    for tag in ("counting", "position", "color_attr"):
        assert len({meta["prompt"] for meta in prompts if meta["tag"] == tag}) == 100
    lines = write_prompts(tmp_path / "evaluation_metadata.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == prompts


# --- ground-truth renders -----------------------------------------------------------------------------------

def test_every_prompt_rendered_at_64px_scores_one_per_task(prompts):
    summary = _gt_summary(prompts, 64)
    assert min(summary["tasks"].values()) >= 0.99 and summary["overall"] >= 0.99, summary


@pytest.mark.parametrize("resolution, step", [(32, 3), (128, 5), (256, 31)])
def test_ground_truth_scores_one_at_other_resolutions(prompts, resolution, step):
    summary = _gt_summary(prompts[::step], resolution)
    assert min(summary["tasks"].values()) >= 0.99, summary


def _gaussian_noise(image):
    rng = np.random.default_rng(zlib.crc32(image.tobytes()))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 8.0, (image.height, image.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _jpeg(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.mark.parametrize("corrupt", [_gaussian_noise, lambda image: image.filter(ImageFilter.GaussianBlur(0.7)), _jpeg],
                         ids=["noise8", "blur0.7", "jpeg90"])
def test_mildly_corrupted_ground_truth_still_scores_high(prompts, corrupt):
    summary = _gt_summary(prompts[::2], 64, corrupt)
    assert min(summary["tasks"].values()) >= 0.95, summary


# --- wrong images fail ----------------------------------------------------------------------------------------

def _other(options, exclude):
    return next(option for option in options if option not in exclude)


def _recoloured(meta):
    """The first object of every coloured clause in another colour; counting recolours one object only."""
    include = [dict(req) for req in meta["include"]]
    if meta["tag"] == "counting":
        (req,) = include
        return [req | {"count": req["count"] - 1},
                {"class": req["class"], "count": 1, "color": _other(sorted(COLORS), [req["color"]])}]
    target = next(req for req in include if "color" in req)
    target["color"] = _other(sorted(COLORS), [target["color"]])
    return include


def _reshaped(meta):
    include = [dict(req) for req in meta["include"]]
    include[0]["class"] = _other(SHAPES, [req["class"] for req in include])
    return include


def _miscounted(meta):
    (req,) = meta["include"]
    return [req | {"count": req["count"] + (1 if req["count"] < 4 else -1)}]


def _undercounted(meta):
    (req,) = meta["include"]
    return [req | {"count": req["count"] - 1}]


def _swapped(meta):
    base, subject = meta["include"]
    return [base, subject | {"position": [OPPOSITE[subject["position"][0]], 0]}]


@pytest.mark.parametrize("wrong, tags", [
    (_recoloured, ("colors", "color_attr", "position", "counting")),
    (_reshaped, ("single_object", "two_object", "counting", "colors", "position", "color_attr")),
    (_miscounted, ("counting",)),
    (_undercounted, ("counting",)),
    (_swapped, ("position",)),
])
def test_images_with_one_attribute_wrong_fail_their_task(prompts, wrong, tags):
    chosen = [meta for meta in prompts if meta["tag"] in tags and (wrong is not _recoloured or
                                                                   "color" in meta["include"][0])][::3]
    images = [render_prompt(meta | {"include": wrong(meta)}, 64, seed=i) for i, meta in enumerate(chosen)]
    summary = _summary(chosen, images)
    assert set(summary["tasks"]) == set(tags) and max(summary["tasks"].values()) == 0.0, summary


def test_noise_and_blank_images_score_zero(prompts):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in prompts]
    assert _summary(prompts, noise)["overall"] <= 0.01
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert detect(blank) == [] and _summary(prompts, [blank] * len(prompts))["overall"] == 0.0


# --- detector -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_detector_recovers_every_object_of_random_scenes(resolution):
    for index in range(40):
        image, _, meta = render_scene(index, 3, resolution)
        found = detect(np.asarray(image))
        expected = sorted((obj["class"], obj["color"]) for obj in meta["objects"])
        assert sorted((d["class"], d["color"]) for d in found) == expected
        for obj in meta["objects"]:
            errors = [max(abs(a - b) for a, b in zip(d["bbox"], obj["bbox"], strict=True))
                      for d in found if (d["class"], d["color"]) == (obj["class"], obj["color"])]
            assert min(errors) < 0.6
        assert all(0.5 <= d["confidence"] <= 1 and d["area"] > 0 for d in found)


def test_detector_rejects_images_that_are_not_rgb():
    with pytest.raises(ValueError, match="HxWx3"):
        detect(np.zeros((32, 32), dtype=np.uint8))


# --- GenEval's rules ----------------------------------------------------------------------------------------

def _det(cls, color, box, confidence=0.9):
    return {"class": cls, "color": color, "bbox": box, "confidence": confidence}


def test_position_uses_genevals_relative_position_with_threshold():
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    target = _det("square", "red", (20, 10, 30, 20))
    clear = score_detections([target, _det("circle", "blue", (5, 10, 15, 20))], meta)
    # centre offset 1.5 shrinks by 0.1 * (10 + 10) = 2 to zero: no relation at all
    slight = score_detections([target, _det("circle", "blue", (18.5, 10, 28.5, 20))], meta)
    assert clear == {"correct": True, "reason": ""}
    assert not slight["correct"] and "expected circle left of target" in slight["reason"]
    missing = score_detections([_det("circle", "blue", (5, 10, 15, 20))], meta)
    assert "no target for circle" in missing["reason"]


def test_colour_and_exclude_are_judged_on_the_most_confident_detections():
    meta = {"tag": "counting", "include": [{"class": "star", "count": 2, "color": "red"}],
            "exclude": [{"class": "star", "count": 3}]}
    reds = [_det("star", "red", (0, 0, 5, 5), 0.9), _det("star", "red", (10, 0, 15, 5), 0.8)]
    assert score_detections(reds, meta)["correct"]
    confident_blue = reds + [_det("star", "blue", (20, 0, 25, 5), 0.95)]
    verdict = score_detections(confident_blue, meta)
    assert not verdict["correct"] and "found 1 red" in verdict["reason"] and "expected star<3" in verdict["reason"]


def test_summary_is_the_mean_of_task_means():
    results = [{"tag": "counting", "correct": True}] * 3 + [{"tag": "colors", "correct": False}]
    summary = summarise(results)
    assert summary["tasks"] == {"counting": 1.0, "colors": 0.0} and summary["overall"] == 0.5
    assert summary["counts"] == {"counting": 3, "colors": 1}


def test_render_prompt_is_deterministic_and_refuses_what_it_cannot_draw(prompts):
    meta = prompts[-1]
    assert render_prompt(meta, 48, seed=2).tobytes() == render_prompt(meta, 48, seed=2).tobytes()
    assert render_prompt(meta, 48, seed=2).tobytes() != render_prompt(meta, 48, seed=3).tobytes()
    with pytest.raises(ConfigError, match="at most 4"):
        render_prompt({"include": [{"class": "star", "count": 5}]})
    with pytest.raises(ConfigError, match="positions"):
        render_prompt({"include": [{"class": "star", "count": 2}, {"class": "circle", "count": 1,
                                                                    "position": ["above", 0]}]})
