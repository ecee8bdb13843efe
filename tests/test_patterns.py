"""Codebook interleaving patterns: round trips, exact layouts, and MusicGen's causality orders."""
import itertools

import pytest
import torch

from tessera.generators import patterns
from tessera.generators.patterns import PATTERNS, build, revert

SPECIAL = 99


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k,t", [(1, 1), (1, 5), (2, 1), (4, 1), (4, 7), (3, 16), (8, 3)])
def test_build_revert_round_trip(pattern, k, t):
    codes = torch.randint(0, 50, (3, k, t))
    seq, valid = build(codes, pattern, SPECIAL)
    s, u = patterns.steps(pattern, k, t), patterns.slots(pattern, k)
    assert seq.shape == (3, s, u) and valid.shape == (s, u) and valid.dtype == torch.bool
    assert int(valid.sum()) == k * t  # every code exactly once
    assert (seq[:, ~valid] == SPECIAL).all() and (seq[:, valid] != SPECIAL).all()
    assert torch.equal(revert(seq, pattern, t), codes)
    assert patterns.frames(pattern, k, s) == t
    # Invalid slots are ignored by revert, whatever they hold.
    noisy = torch.where(valid, seq, torch.randint(0, 50, seq.shape))
    assert torch.equal(revert(noisy, pattern, t), codes)


def test_delay_layout_by_hand():
    # codes[k, t] = 10 * k + t
    codes = (10 * torch.arange(3)[:, None] + torch.arange(4)[None, :])[None]
    seq, valid = build(codes, "delay", -1)
    assert seq[0].tolist() == [
        [0, -1, -1],
        [1, 10, -1],
        [2, 11, 20],
        [3, 12, 21],
        [-1, 13, 22],
        [-1, -1, 23],
    ]
    assert valid.tolist() == (seq[0] >= 0).tolist()
    assert patterns.codebook_index("delay", 3, 4).tolist() == [[0, 1, 2]] * 6


def test_flattened_layout_by_hand():
    codes = (10 * torch.arange(3)[:, None] + torch.arange(2)[None, :])[None]
    seq, valid = build(codes, "flattened", -1)
    assert seq[0, :, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert valid.all()
    assert patterns.codebook_index("flattened", 3, 2)[:, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_parallel_and_coarse_first_layouts_by_hand():
    codes = (10 * torch.arange(3)[:, None] + torch.arange(2)[None, :])[None]
    assert build(codes, "parallel", -1)[0][0].tolist() == [[0, 10, 20], [1, 11, 21]]
    assert build(codes, "coarse_first", -1)[0][0].tolist() == [
        [0, -1, -1],
        [1, -1, -1],
        [-1, 10, 20],
        [-1, 11, 21],
    ]


def _depends_on(pattern: str, k: int, t: int, k2: int, t2: int) -> bool:
    """Does MusicGen's pattern make (k, t) conditional on (k2, t2)?"""
    if (k, t) == (k2, t2):
        return False
    if pattern == "parallel":
        return t2 < t
    if pattern == "delay":
        return k2 <= k and t2 <= t  # includes (k-1, t): the coarser stream of the same frame
    if pattern == "flattened":
        return (t2, k2) < (t, k)
    # coarse_first: stream 0 is plain AR; the fine streams see all of stream 0 and earlier fine frames
    if k == 0:
        return k2 == 0 and t2 < t
    return k2 == 0 or t2 < t


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k,t", [(1, 3), (2, 4), (4, 5)])
def test_causality(pattern, k, t):
    """Each code sits at a strictly later step than every code MusicGen conditions it on."""
    lay = patterns.layout(pattern, k, t)
    step_of = lay.position // lay.slots  # (K, T)
    for (a, ta), (b, tb) in itertools.product(itertools.product(range(k), range(t)), repeat=2):
        if _depends_on(pattern, a, ta, b, tb):
            assert step_of[b, tb] < step_of[a, ta], (pattern, (a, ta), (b, tb))
    # and the slot's codebook is the code's
    for a, ta in itertools.product(range(k), range(t)):
        s, u = divmod(int(lay.position[a, ta]), lay.slots)
        assert lay.codebook[s, u] == a and lay.frame[s, u] == ta


def test_delay_fine_stream_follows_coarse_of_same_frame():
    step_of = patterns.layout("delay", 4, 6).position  # U = 4
    step_of = step_of // 4
    assert (step_of[1:] == step_of[:-1] + 1).all()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown codebook pattern"):
        patterns.steps("zigzag", 4, 3)
    with pytest.raises(ValueError, match="layout"):
        revert(torch.zeros(1, 5, 4, dtype=torch.long), "delay", 3)
    with pytest.raises(ValueError, match="whole"):
        patterns.frames("flattened", 4, 7)
