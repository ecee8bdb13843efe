"""GenEval-style compositional benchmark on the procedural shapes world, scored exactly.

Prompts use GenEval's metadata schema (`tag`, `include`, `exclude` for counting, `prompt`) and six
tags, drawn with the caption templates of `tessera.data.shapes`. Images are scored with GenEval's
rules (`evaluate` in its evaluate_images.py) on the detections of the exact shape detector instead of
Mask2Former + CLIP: the top-`count` detections of a class by confidence must exist, carry the
requested colour and stand in the requested relation (GenEval's `relative_position`); an `exclude`
clause fails the image when `count` or more objects of its class are found. The summary is the
mean accuracy per tag and, as in GenEval, the overall score is the mean of those task means.
GenEval keeps detections above 0.3 confidence (0.9 for counting); here one threshold, the detector's
`MIN_CONFIDENCE` (a geometric fit, not a learned score), serves every task.
"""
from __future__ import annotations

import copy
import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..config import ConfigError
from ..data.shapes import (BACKGROUND, COLORS, SUPERSAMPLE, TAGS, check_resolution, draw_shape, layout_boxes,
                           make_prompt, object_list, relative_position)
from .shape_detector import detect

PROMPTS_PER_TASK = 100
MAX_OBJECTS = 16  # GenEval keeps at most this many detections per class
_DRAWS_PER_TASK = 5000  # prompt draws per tag while collecting distinct prompts


def _distinct_prompts(rng: random.Random, tag: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` distinct prompts of `tag` in draw order, de-duplicated as GenEval's create_prompts does;
    a tag with fewer distinct prompts than `limit` (e.g. single_object) yields all of them."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(_DRAWS_PER_TASK):
        meta = make_prompt(rng, tag)
        if not meta["exclude"]:
            del meta["exclude"]  # GenEval writes `exclude` for counting prompts only
        seen.setdefault(json.dumps(meta, sort_keys=True), meta)
        if len(seen) == limit:
            break
    return list(seen.values())


def prompt_set(seed: int = 0, per_task: int = PROMPTS_PER_TASK) -> list[dict[str, Any]]:
    """The benchmark's prompts (GenEval metadata), grouped by tag in TAGS order; deterministic in `seed`.

    Every tag gets `per_task` distinct prompts; a tag with fewer (5 single_object, 20 two_object,
    40 colors prompts exist) repeats all of them equally often, to at least `per_task`."""
    rng = random.Random(f"tessera-compositional-prompts:{seed}")
    prompts = []
    for tag in TAGS:
        distinct = _distinct_prompts(rng, tag, per_task)
        prompts += [copy.deepcopy(meta) for meta in distinct * math.ceil(per_task / len(distinct))]
    return prompts


def write_prompts(path: str | Path, seed: int = 0, per_task: int = PROMPTS_PER_TASK) -> Path:
    """Write `prompt_set(seed, per_task)` as JSONL, one metadata object a line (GenEval's evaluation_metadata.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(meta) + "\n" for meta in prompt_set(seed, per_task)))
    return path


def _relation(include: list[dict[str, Any]]) -> str | None:
    """The relation of object 1 to object 0 that a position prompt asks for; None without one.
    Raises ConfigError for what shapes.py cannot lay out (over 4 objects, other kinds of position)."""
    if sum(req["count"] for req in include) > 4:
        raise ConfigError(f"at most 4 objects can be drawn, metadata asks for {include}")
    if not any("position" in req for req in include):
        return None
    drawable = (len(include) == 2 and "position" not in include[0] and include[1]["position"][1] == 0
                and include[0]["count"] == include[1]["count"] == 1)
    if not drawable:
        raise ConfigError(f"only 'one object [relation] another' positions can be drawn, got {include}")
    return include[1]["position"][0]


def render_prompt(metadata: dict[str, Any], resolution: int = 64, seed: int = 0) -> Image.Image:
    """A ground-truth image of `metadata`: its objects laid out and drawn as shapes.render_scene draws
    scenes (colours the prompt leaves open are drawn at random); deterministic in (prompt, seed)."""
    check_resolution(resolution)
    rng = random.Random(f"tessera-compositional-render:{seed}:{json.dumps(metadata['include'], sort_keys=True)}")
    objects = object_list(rng, metadata["include"])
    boxes = layout_boxes(rng, [cls for cls, _ in objects], _relation(metadata["include"]))
    canvas = resolution * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for (cls, color), box in zip(objects, boxes, strict=True):
        draw_shape(draw, cls, box, COLORS[color], canvas)
    return image.reduce(SUPERSAMPLE)


def _by_class(detections: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Detections grouped by class, most confident first, at most MAX_OBJECTS per class."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for det in sorted(detections, key=lambda d: -d["confidence"]):
        if len(grouped[det["class"]]) < MAX_OBJECTS:
            grouped[det["class"]].append(det)
    return grouped


def _position_failure(found: list[dict[str, Any]], targets: list[dict[str, Any]] | None, req: dict[str, Any]) -> str:
    """GenEval's position check of `found` objects against the matched target group; '' when it holds."""
    relation = req["position"][0]
    if targets is None:
        return f"no target for {req['class']} to be {relation}"
    for obj in found:
        for target in targets:
            actual = relative_position(obj["bbox"], target["bbox"])
            if relation not in actual:
                return f"expected {req['class']} {relation} target, found {' and '.join(sorted(actual))} target"
    return ""


def _include_failure(objects: dict[str, list[dict[str, Any]]], req: dict[str, Any],
                     matched: list[list[dict[str, Any]] | None]) -> tuple[str, list[dict[str, Any]]]:
    """GenEval's check of one `include` clause: (reason it fails or '', the top-`count` detections)."""
    found = objects.get(req["class"], [])[:req["count"]]
    if len(found) < req["count"]:
        return f"expected {req['class']}>={req['count']}, found {len(found)}", found
    if "color" in req:
        colors = [obj["color"] for obj in found]
        if colors.count(req["color"]) < req["count"]:
            others = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
            return (f"expected {req['color']} {req['class']}>={req['count']}, found "
                    f"{colors.count(req['color'])} {req['color']}; and {others}"), found
    if "position" in req:
        return _position_failure(found, matched[req["position"][1]], req), found
    return "", found


def score_detections(detections: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """GenEval's verdict on detections for one prompt: `include` clauses ANDed (colour and position
    judged on the top-`count` detections by confidence), any `exclude` clause with `count` or more
    objects of its class fails. Returns {"correct", "reason"}."""
    objects = _by_class(detections)
    reasons: list[str] = []
    matched: list[list[dict[str, Any]] | None] = []
    for req in metadata.get("include", []):
        reason, found = _include_failure(objects, req, matched)
        reasons += [reason] if reason else []
        matched.append(None if reason else found)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return {"correct": not reasons, "reason": "\n".join(reasons)}


def score_image(image: Image.Image | np.ndarray, metadata: dict[str, Any]) -> dict[str, Any]:
    """Score one image (PIL or uint8 HxWx3) against one prompt's metadata: {"correct": bool, "reason": str}."""
    return score_detections(detect(image), metadata)


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-tag accuracy of results carrying `tag` and `correct`, with image counts, and `overall`:
    the mean of the task means over the tags present (GenEval's summary_scores)."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        by_tag[result["tag"]].append(bool(result["correct"]))
    tags = [tag for tag in TAGS if tag in by_tag] + sorted(set(by_tag) - set(TAGS))
    tasks = {tag: sum(by_tag[tag]) / len(by_tag[tag]) for tag in tags}
    return {"tasks": tasks, "counts": {tag: len(by_tag[tag]) for tag in tags},
            "overall": sum(tasks.values()) / len(tasks) if tasks else 0.0}
