"""Small PNG charts for evaluation reports, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from ..images import save_image_atomic

_W, _H, _PAD = 640, 360, 48
_AXIS, _BAR, _TEXT = (60, 60, 60), (70, 110, 200), (20, 20, 20)


def _canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_PAD, 12), title, fill=_TEXT)
    draw.line([(_PAD, _H - _PAD), (_W - _PAD // 2, _H - _PAD)], fill=_AXIS)
    draw.line([(_PAD, _PAD), (_PAD, _H - _PAD)], fill=_AXIS)
    return image, draw


def bar_chart(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str,
              top: float | None = None) -> Path:
    """Vertical bars with their values printed above; `top` fixes the y range (e.g. 1 for accuracies)."""
    if len(labels) != len(values) or not labels:
        raise ValueError(f"bar_chart needs one value per label, got {len(labels)} labels and {len(values)} values")
    image, draw = _canvas(title)
    top = top or max(max(values), 1e-9)
    slot = (_W - 1.5 * _PAD) / len(labels)
    height = _H - 2 * _PAD
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = _PAD + i * slot + slot * 0.15
        x1 = x0 + slot * 0.7
        y = _H - _PAD - height * max(0.0, min(value / top, 1.0))
        draw.rectangle([x0, y, x1, _H - _PAD], fill=_BAR)
        draw.text((x0, y - 14), f"{value:.3g}", fill=_TEXT)
        draw.text((x0, _H - _PAD + 6), label[:14], fill=_TEXT)
    return save_image_atomic(image, path)


def line_chart(xs: Sequence[float], ys: Sequence[float], path: str | Path, title: str, x_label: str) -> Path:
    """One line with marked points (e.g. FD against the CFG weight)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"line_chart needs one y per x, got {len(xs)} and {len(ys)}")
    image, draw = _canvas(title)
    lo_x, hi_x = min(xs), max(xs)
    lo_y, hi_y = min(ys), max(ys)
    span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0

    def point(x: float, y: float) -> tuple[float, float]:
        return (_PAD + 20 + (x - lo_x) / span_x * (_W - 2.5 * _PAD - 20),
                _H - _PAD - 20 - (y - lo_y) / span_y * (_H - 2 * _PAD - 40))
    points = [point(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=_BAR, width=2)
    for (px, py), x, y in zip(points, xs, ys):
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=_BAR)
        draw.text((px + 5, py - 14), f"{y:.3g}", fill=_TEXT)
        draw.text((px - 6, _H - _PAD + 6), f"{x:g}", fill=_TEXT)
    draw.text((_W // 2 - 20, _H - 20), x_label, fill=_TEXT)
    return save_image_atomic(image, path)


def marked_grid(images: torch.Tensor, passed: Sequence[bool], path: str | Path, nrow: int = 8,
                border: int = 3) -> Path:
    """A grid of uint8 images (N, 3, H, W), each framed green if it passed and red if not."""
    if images.shape[0] != len(passed) or images.shape[0] == 0:
        raise ValueError(f"marked_grid needs one pass/fail mark per image, got {images.shape[0]} and {len(passed)}")
    n, _, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    cell_h, cell_w = h + 2 * border, w + 2 * border
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    for i, (image, ok) in enumerate(zip(images, passed)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        grid.paste((40, 170, 60) if ok else (210, 40, 40), [x, y, x + cell_w, y + cell_h])
        grid.paste(Image.fromarray(image.permute(1, 2, 0).to(torch.uint8).numpy()), (x + border, y + border))
    return save_image_atomic(grid, path)
