"""Mask schedules and mask drawing shared by masked training and decoding."""
import math

import pytest
import torch

from tessera.config import ConfigError
from tessera.generators.masking import (mask_ratio, masked_after_step, random_token_mask, span_count_table,
                                        span_mask)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square", "arccos"])
def test_schedules_go_from_all_to_none_monotonically(schedule):
    r = torch.linspace(0, 1, 101)
    gamma = mask_ratio(schedule, r)
    assert gamma[0] == pytest.approx(1.0) and gamma[-1] == pytest.approx(0.0, abs=1e-6)
    assert (gamma[1:] <= gamma[:-1] + 1e-7).all()
    with pytest.raises(ConfigError, match="schedule"):
        mask_ratio("sigmoid", r)


def test_masked_after_step_is_the_floor_of_the_schedule_and_ends_at_zero():
    unknown = torch.tensor([256, 10, 0])
    counts = [masked_after_step("cosine", unknown, t, 8).tolist() for t in range(8)]
    assert counts[-1] == [0, 0, 0]
    for t in range(7):
        assert counts[t] == [math.floor(u * math.cos(math.pi / 2 * (t + 1) / 8)) for u in (256, 10, 0)]


def test_random_token_mask_counts_exactly():
    ratios = torch.tensor([0.0, 0.25, 0.5, 1.0])
    mask = random_token_mask(ratios, 16, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [1, 4, 8, 16]


def test_span_table_inverts_the_expected_coverage():
    table = span_count_table(100, 3)
    assert list(table) == sorted(table) and table[0] == 1
    for percent in (10, 50, 90):
        u = table[percent]
        coverage = lambda n: 1 - math.prod((100 - 3 - j) / (100 - j) for j in range(n))  # noqa: E731
        assert coverage(u) >= percent / 100 > coverage(u - 1)


def test_span_masks_are_runs_and_cover_about_the_asked_fraction():
    torch.manual_seed(0)
    ratios = torch.full((400,), 0.5)
    mask = span_mask(ratios, 100, 3)
    assert abs(mask.float().mean().item() - 0.5) < 0.03
    # every masked run is at least 3 long except where clipped by the end
    row = mask[0].int().tolist()
    runs, run = [], 0
    for i, v in enumerate(row + [0]):
        if v:
            run += 1
        elif run:
            runs.append((run, i))
            run = 0
    assert all(length >= 3 or end == 100 for length, end in runs)
