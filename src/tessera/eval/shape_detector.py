"""Exact, deterministic detector for the procedural shapes of `tessera.data.shapes`.

shapes.py draws solid palette-coloured shapes on a plain background with anti-aliased edges, so
every pixel is a blend of the background and (at most) one palette colour. Each pixel is explained
as the blend that fits it best, which gives its colour and its coverage. Connected cores (pixels at
least half covered by one colour) are objects; each object's shape is classified by fitting every
shape template at the object's measured area and centroid and keeping the best soft IoU between
template coverage and observed coverage, which is also the detection's confidence.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..data.shapes import BACKGROUND, COLORS, EXTENTS, POLYGONS, SHAPES

CORE_ALPHA = 0.5  # a pixel is part of an object's core when at least half covered by its colour
MAX_RESIDUAL = 48.0  # largest RGB distance of a core pixel from its background-to-colour blend line
MIN_AREA = 0.008  # smallest object core (in pixels at least half covered), as a fraction of the image area
MIN_CONFIDENCE = 0.5  # smallest template IoU a detection may have
RING = 2  # pixels around a core that may hold its anti-aliased or blurred edge
TEMPLATE_SUPERSAMPLE = 8
BLUR_SIGMAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # edge blurs (pixels) tried on every template; best counts

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32) - _BACKGROUND
Box = tuple[float, float, float, float]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float32 RGB in 0..255 from a PIL image or a uint8 HxWx3 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {pixels.shape}")
    return pixels


def _blend_fields(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour k: coverage alpha_k in [0, 1] of the best blend
    BACKGROUND + alpha_k * (COLORS[k] - BACKGROUND), and the RGB distance to that blend (HxWxK each)."""
    offset = pixels - _BACKGROUND
    alpha = np.clip(offset @ _DIRECTIONS.T / (_DIRECTIONS ** 2).sum(1), 0.0, 1.0)
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * _DIRECTIONS, axis=-1)
    return alpha, residual


def _cores(alpha: np.ndarray, residual: np.ndarray, min_pixels: float) -> tuple[np.ndarray, list[int]]:
    """Label map of object cores (0 = none; 4-connected, one colour each, at least `min_pixels` big)
    and each label's colour index. Smaller specks (edge colour fringes, noise) stay unlabelled."""
    best = residual.argmin(-1)
    covered = np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= CORE_ALPHA
    core = covered & (residual.min(-1) <= MAX_RESIDUAL)
    labels, colours = np.zeros(best.shape, dtype=np.int32), []
    for k in range(len(_COLOR_NAMES)):
        found, n = ndimage.label(core & (best == k))
        sizes = np.bincount(found.ravel(), minlength=n + 1)[1:]
        for index in np.flatnonzero(sizes >= min_pixels):
            colours.append(k)
            labels[found == index + 1] = len(colours)
    return labels, colours


def _observed_coverage(labels: np.ndarray, alpha_k: np.ndarray, label: int, window: tuple[slice, slice]) -> np.ndarray:
    """Coverage of object `label` inside `window`: its core and the ring around it that no other core owns."""
    mine = labels[window] == label
    free = (labels[window] == 0) | mine
    region = ndimage.binary_dilation(mine, iterations=RING) & free
    return np.where(region, alpha_k[window], 0.0)


@cache
def _template_moments(cls: str) -> tuple[float, float, float]:
    """Area and centroid (gx, gy) of shape `cls` drawn at size 1 (the box shapes.py scales)."""
    if cls == "circle":
        return math.pi / 4, 0.5, 0.5
    pts = POLYGONS[cls]
    area = gx = gy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        area, gx, gy = area + cross / 2, gx + (x0 + x1) * cross, gy + (y0 + y1) * cross
    return abs(area), gx / (6 * area), gy / (6 * area)


def _template_coverage(cls: str, x0: float, y0: float, size: float, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage (HxW in [0, 1]) of shape `cls` with top-left (x0, y0) and `size`, in window pixels."""
    s = TEMPLATE_SUPERSAMPLE
    canvas = Image.new("L", (shape[1] * s, shape[0] * s), 0)
    draw = ImageDraw.Draw(canvas)
    if cls == "circle":
        draw.ellipse((x0 * s, y0 * s, (x0 + size) * s - 1, (y0 + size) * s - 1), fill=255)
    else:
        draw.polygon([((x0 + px * size) * s, (y0 + py * size) * s) for px, py in POLYGONS[cls]], fill=255)
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def _fit_template(cls: str, coverage: np.ndarray, area: float, centroid: tuple[float, float]) -> tuple[float, Box]:
    """Soft IoU of template `cls` placed with the object's area and centroid (best over BLUR_SIGMAS),
    and the template's bbox, in the pixels of the coverage window."""
    unit_area, gx, gy = _template_moments(cls)
    size = math.sqrt(area / unit_area)
    x0, y0 = centroid[0] - gx * size, centroid[1] - gy * size
    x1, y1 = x0 + EXTENTS[cls][0] * size, y0 + EXTENTS[cls][1] * size
    left, top = max(0, math.ceil(-x0)) + RING, max(0, math.ceil(-y0)) + RING  # room for blurred template edges
    height = max(coverage.shape[0], math.ceil(y1)) + top + RING
    width = max(coverage.shape[1], math.ceil(x1)) + left + RING
    observed = np.zeros((height, width), dtype=np.float32)
    observed[top:top + coverage.shape[0], left:left + coverage.shape[1]] = coverage
    sharp = _template_coverage(cls, x0 + left, y0 + top, size, (height, width))
    iou = max(_soft_iou(observed, ndimage.gaussian_filter(sharp, sigma, mode="constant") if sigma else sharp)
              for sigma in BLUR_SIGMAS)
    return iou, (x0, y0, x1, y1)


def _fit_templates(coverage: np.ndarray) -> dict[str, tuple[float, Box]]:
    """(soft IoU, bbox in window pixels) of every shape template fitted to an object's coverage window."""
    ys, xs = np.indices(coverage.shape, dtype=np.float64) + 0.5  # pixel centres
    area = float(coverage.sum())
    centroid = float((coverage * xs).sum()) / area, float((coverage * ys).sum()) / area
    return {cls: _fit_template(cls, coverage, area, centroid) for cls in SHAPES}


def detect(image: Image.Image | np.ndarray, min_confidence: float = MIN_CONFIDENCE) -> list[dict[str, Any]]:
    """Shapes in a rendered image, most confident first: dicts with `class`, `color`, `bbox`
    (x0, y0, x1, y1 in pixels), `centre` (of the bbox), `area` (covered pixels) and `confidence`
    (soft IoU of the fitted template). Cores smaller than MIN_AREA of the image are ignored."""
    pixels = _as_array(image)
    alpha, residual = _blend_fields(pixels)
    labels, colours = _cores(alpha, residual, MIN_AREA * pixels.shape[0] * pixels.shape[1])
    detections = []
    for label, window in enumerate(ndimage.find_objects(labels), start=1):
        window = tuple(slice(max(0, w.start - RING), w.stop + RING) for w in window)
        coverage = _observed_coverage(labels, alpha[..., colours[label - 1]], label, window)
        fits = _fit_templates(coverage)
        cls = max(fits, key=lambda name: fits[name][0])
        confidence, (x0, y0, x1, y1) = fits[cls]
        if confidence >= min_confidence:
            left, top = window[1].start, window[0].start
            bbox = (x0 + left, y0 + top, x1 + left, y1 + top)
            detections.append({"class": cls, "color": _COLOR_NAMES[colours[label - 1]], "bbox": bbox,
                               "centre": ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2),
                               "area": float(coverage.sum()), "confidence": confidence})
    return sorted(detections, key=lambda d: -d["confidence"])
