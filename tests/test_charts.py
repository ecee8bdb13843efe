"""PNG charts and the pass/fail grid of evaluation reports."""
import numpy as np
import pytest
import torch
from PIL import Image

from tessera.eval.charts import bar_chart, line_chart, marked_grid


def test_bar_and_line_charts_are_pngs(tmp_path):
    bars = bar_chart(["single", "two", "count"], [1.0, 0.5, 0.0], tmp_path / "bars.png", "accuracy", top=1.0)
    line = line_chart([1, 2, 3, 4], [30.0, 20.0, 18.0, 21.0], tmp_path / "line.png", "FD vs CFG", "cfg")
    for path in (bars, line):
        image = np.asarray(Image.open(path))
        assert image.shape == (360, 640, 3) and (image != 255).any()
    with pytest.raises(ValueError, match="one value per label"):
        bar_chart(["a"], [1.0, 2.0], tmp_path / "bad.png", "x")


def test_marked_grid_frames_pass_green_and_fail_red(tmp_path):
    images = torch.full((3, 3, 8, 8), 128, dtype=torch.uint8)
    grid = np.asarray(Image.open(marked_grid(images, [True, False, True], tmp_path / "grid.png", nrow=2, border=2)))
    assert grid.shape == (2 * 12, 2 * 12, 3)
    assert tuple(grid[0, 0]) == (40, 170, 60) and tuple(grid[0, 12]) == (210, 40, 40)
    assert tuple(grid[5, 5]) == (128, 128, 128)
    with pytest.raises(ValueError, match="one pass/fail mark per image"):
        marked_grid(images, [True], tmp_path / "bad.png")
