"""Procedural captioned scenes with exact ground truth in GenEval's metadata schema.

Each scene shows 1-4 solid-coloured shapes on a plain light background, never overlapping.
Its caption comes from templates for GenEval's six tags (single_object, two_object, counting,
colors, position, color_attr) and the scene always satisfies it: the metadata is
`{"tag", "include", "exclude", "prompt"}` as in GenEval, plus `objects` (class, colour, rgb,
pixel bbox and centre of every object) and `resolution`. Layouts are drawn in normalised
coordinates, so one (index, seed) gives the same scene at every resolution.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..config import ConfigError, check_range
from .shards import DatasetInfo, DatasetWriter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 135, 20), "yellow": (235, 200, 20), "green": (40, 160, 60),
    "blue": (40, 90, 220), "purple": (135, 60, 185), "pink": (240, 110, 180), "brown": (125, 75, 35),
}
BACKGROUND: tuple[int, int, int] = (245, 244, 240)
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
MIN_RESOLUTION, MAX_RESOLUTION = 32, 256
POSITION_THRESHOLD = 0.1  # GenEval: centre offsets shrink by this fraction of the summed box sizes

SUPERSAMPLE = 4
_MARGIN, _GAP = 0.03, 0.05  # normalised: border margin, minimum gap between object boxes
_SIZES = {1: (0.35, 0.6), 2: (0.25, 0.4), 3: (0.22, 0.32), 4: (0.2, 0.28)}  # normalised sizes by object count


def _normalised(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Shift and scale a polygon so its bbox is [0, w] x [0, h] with max(w, h) = 1."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale = max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - min(xs)) / scale, (y - min(ys)) / scale) for x, y in points]


def _regular(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (or n-pointed star, alternating `radii`) from angle `start_deg`."""
    steps = n * len(radii)
    return [(radii[i % len(radii)] * math.cos(math.radians(start_deg + 360 * i / steps)),
             radii[i % len(radii)] * math.sin(math.radians(start_deg + 360 * i / steps))) for i in range(steps)]


POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "triangle": _normalised(_regular(3, -90)),
    "star": _normalised(_regular(5, -90, (1.0, 0.5))),
    "hexagon": _normalised(_regular(6, 0)),
}
EXTENTS: dict[str, tuple[float, float]] = {"circle": (1.0, 1.0)} | {
    name: (max(p[0] for p in pts), max(p[1] for p in pts)) for name, pts in POLYGONS.items()}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(shape: str, color: str | None = None) -> str:
    """'a circle', 'an orange circle'."""
    words = f"{color} {shape}" if color else shape
    return f"{_article(words)} {words}"


def make_prompt(rng: random.Random, tag: str | None = None, photo: bool = True) -> dict[str, Any]:
    """One prompt with GenEval metadata `{"tag", "include", "exclude", "prompt"}`.

    `tag` is drawn uniformly from TAGS when None; `photo` prefixes "a photo of ".
    """
    tag = tag or rng.choice(TAGS)
    if tag not in TAGS:
        raise ConfigError(f"unknown shapes tag {tag!r}; valid tags: {', '.join(TAGS)}")
    shape_a, shape_b = rng.sample(SHAPES, 2)
    color_a, color_b = rng.sample(sorted(COLORS), 2)
    exclude: list[dict[str, Any]] = []
    if tag == "single_object":
        include = [{"class": shape_a, "count": 1}]
        text = _phrase(shape_a)
    elif tag == "colors":
        include = [{"class": shape_a, "count": 1, "color": color_a}]
        text = _phrase(shape_a, color_a)
    elif tag == "two_object":
        include = [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}]
        text = f"{_phrase(shape_a)} and {_phrase(shape_b)}"
    elif tag == "color_attr":
        include = [{"class": shape_a, "count": 1, "color": color_a}, {"class": shape_b, "count": 1, "color": color_b}]
        text = f"{_phrase(shape_a, color_a)} and {_phrase(shape_b, color_b)}"
    elif tag == "counting":
        count = rng.choice(sorted(NUMBER_WORDS))
        colored = rng.random() < 0.5
        include = [{"class": shape_a, "count": count} | ({"color": color_a} if colored else {})]
        exclude = [{"class": shape_a, "count": count + 1}]
        text = f"{NUMBER_WORDS[count]} {color_a + ' ' if colored else ''}{shape_a}s"
    else:  # position: include[1] (the subject) stands in `relation` to include[0]
        relation = rng.choice(RELATIONS)
        include = [{"class": shape_b, "count": 1, "color": color_b},
                   {"class": shape_a, "count": 1, "color": color_a, "position": [relation, 0]}]
        text = f"{_phrase(shape_a, color_a)} {relation} {_phrase(shape_b, color_b)}"
    return {"tag": tag, "include": include, "exclude": exclude, "prompt": ("a photo of " if photo else "") + text}


def generate_prompts(n: int, seed: int = 0, tags: Sequence[str] = TAGS) -> list[dict[str, Any]]:
    """`n` evaluation prompts (GenEval metadata), cycling through `tags`; deterministic in `seed`."""
    rng = random.Random(f"tessera-shapes-prompts:{seed}")
    return [make_prompt(rng, tags[i % len(tags)]) for i in range(n)]


def relative_position(box_a: Sequence[float], box_b: Sequence[float], cutoff: float = 0.5) -> set[str]:
    """GenEval's relations of box A to box B (x0, y0, x1, y1): centre offset shrunk by
    POSITION_THRESHOLD * (dim_a + dim_b), divided by the offset's norm; `dx < -cutoff` is "left of"."""
    offset = [(box_a[i] + box_a[i + 2]) / 2 - (box_b[i] + box_b[i + 2]) / 2 for i in (0, 1)]
    dims = [box_a[i + 2] - box_a[i] + box_b[i + 2] - box_b[i] for i in (0, 1)]
    revised = [math.copysign(max(abs(o) - POSITION_THRESHOLD * d, 0.0), o) for o, d in zip(offset, dims, strict=True)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    return {name for name, hit in (("left of", dx < -cutoff), ("right of", dx > cutoff),
                                   ("above", dy < -cutoff), ("below", dy > cutoff)) if hit}


def object_list(rng: random.Random, include: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(class, colour) of every object the metadata asks for; unnamed colours drawn at random."""
    return [(req["class"], req.get("color") or rng.choice(sorted(COLORS)))
            for req in include for _ in range(req["count"])]


def _boxes_apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def layout_boxes(rng: random.Random, classes: list[str], relation: str | None) -> list[tuple[float, ...]]:
    """Normalised non-overlapping boxes for `classes`; with `relation`, box 1 stands so to box 0
    (checked with a stricter cutoff than GenEval's, and with no other relation even loosely)."""
    low, high = _SIZES[len(classes)]
    for attempt in range(200):
        shrink = 0.97 ** (attempt // 10)
        boxes: list[tuple[float, ...]] = []
        for cls in classes:
            size = rng.uniform(low, high) * shrink
            w, h = EXTENTS[cls][0] * size, EXTENTS[cls][1] * size
            for _ in range(30):
                x0, y0 = rng.uniform(_MARGIN, 1 - _MARGIN - w), rng.uniform(_MARGIN, 1 - _MARGIN - h)
                box = (x0, y0, x0 + w, y0 + h)
                if all(_boxes_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) < len(classes):
            continue
        if relation is None or (relation in relative_position(boxes[1], boxes[0], cutoff=0.6)
                                and relative_position(boxes[1], boxes[0], cutoff=0.4) == {relation}):
            return boxes
    raise RuntimeError(f"could not lay out {classes} (relation {relation}); this is a bug")


def draw_shape(draw: ImageDraw.ImageDraw, cls: str, box: tuple[float, ...], rgb: tuple[int, int, int], scale: float) -> None:
    """Draw shape `cls` filling the normalised `box` (scaled by `scale` pixels) in colour `rgb`."""
    x0, y0, x1, y1 = (v * scale for v in box)
    if cls == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    else:
        size = max(x1 - x0, y1 - y0)
        draw.polygon([(x0 + px * size, y0 + py * size) for px, py in POLYGONS[cls]], fill=rgb)


def check_resolution(resolution: int) -> None:
    """Raise ConfigError unless MIN_RESOLUTION <= resolution <= MAX_RESOLUTION."""
    check_range("resolution", resolution, MIN_RESOLUTION, MAX_RESOLUTION)


def render_scene(index: int, seed: int, resolution: int) -> tuple[Image.Image, str, dict[str, Any]]:
    """Scene number `index` of the set `seed`: (RGB image, caption, metadata); deterministic."""
    check_resolution(resolution)
    if index < 0 or seed < 0:
        raise ConfigError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = random.Random(f"tessera-shapes:{seed}:{index}")
    meta = make_prompt(rng, photo=rng.random() < 0.5)
    objects = object_list(rng, meta["include"])
    relation = meta["include"][1]["position"][0] if meta["tag"] == "position" else None
    boxes = layout_boxes(rng, [cls for cls, _ in objects], relation)
    canvas = resolution * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    records = []
    for (cls, color), box in zip(objects, boxes, strict=True):
        draw_shape(draw, cls, box, COLORS[color], canvas)
        px = [round(v * resolution, 2) for v in box]
        records.append({"class": cls, "color": color, "rgb": list(COLORS[color]), "bbox": px,
                        "center": [round((px[0] + px[2]) / 2, 2), round((px[1] + px[3]) / 2, 2)]})
    image = image.reduce(SUPERSAMPLE)  # box average: anti-aliased edges, solid interiors
    meta |= {"objects": records, "resolution": resolution}
    return image, meta["prompt"], meta


def write_shapes_dataset(out: str | Path, n: int, resolution: int, seed: int = 0, per_shard: int = 5000,
                         progress: bool = False) -> dict[str, Any]:
    """Render scenes 0..n-1 of set `seed` into WebDataset shards in `out`; returns dataset.json's contents."""
    check_resolution(resolution)
    check_range("n", n, 1)
    info = DatasetInfo(name=f"shapes{resolution}", source=f"tessera procedural shapes (seed {seed})",
                       license="CC0-1.0 (generated)", resolution=resolution,
                       description="1-4 non-overlapping coloured shapes, GenEval-style caption and metadata")
    with DatasetWriter(out, info, prefix="shapes", per_shard=per_shard) as writer:
        for index in tqdm(range(n), desc=f"shapes {resolution}px", unit="img", disable=not progress):
            image, caption, meta = render_scene(index, seed, resolution)
            writer.write(f"{index:08d}", image, caption, meta)
    return writer.info
