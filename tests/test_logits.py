"""Logits processing, the sampler's distribution and determinism, guidance schedules, SamplingConfig."""
import math

import pytest
import torch

from tessera.config import ConfigError
from tessera.samplers.guidance import GuidanceSchedule, guided_logits
from tessera.samplers.logits import (SamplingConfig, apply_temperature, exponential_noise, sample_from_logits,
                                     top_k_filter, top_p_filter)


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


def test_top_k_keeps_exactly_k_largest():
    logits = torch.randn(2, 3, 50)
    out = top_k_filter(logits, 7)
    assert kept(out).sum(-1).eq(7).all()
    top = logits.topk(7, dim=-1).indices
    assert kept(out).gather(-1, top).all()
    assert torch.equal(out.gather(-1, top), logits.gather(-1, top))
    assert top_k_filter(logits, 0) is logits
    assert top_k_filter(logits, 50) is logits


def test_top_p_keeps_minimal_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # by rank: ids 1, 3, 4, 2, 0
    logits = probs.log()
    expect = {0.35: [1], 0.6: [1, 3], 0.8: [1, 3, 4], 0.9: [1, 2, 3, 4], 0.99: [0, 1, 2, 3, 4]}
    for p, ids in expect.items():
        got = kept(top_p_filter(logits, p)).nonzero().flatten().tolist()
        assert got == ids, (p, got)
    tiny = top_p_filter(logits, 1e-6)
    assert kept(tiny).nonzero().flatten().tolist() == [1]
    assert top_p_filter(logits, 1.0) is logits


def test_top_p_works_per_row_with_leading_dims():
    logits = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).log().expand(4, 2, 3)
    out = kept(top_p_filter(logits, 0.85))
    assert out[:, 0].tolist() == [[True, True, False]] * 4
    assert out[:, 1].tolist() == [[True, False, True]] * 4 or out[:, 1].tolist() == [[False, True, True]] * 4


def test_temperature_zero_is_argmax_and_shapes_follow_leading_dims():
    logits = torch.randn(2, 9, 33)
    assert torch.equal(sample_from_logits(logits, temperature=0.0), logits.argmax(-1))
    out = sample_from_logits(logits, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 9) and out.dtype == torch.long
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_sampler_is_reproducible_with_a_generator():
    logits = torch.randn(4, 16, 100)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = sample_from_logits(logits, generator=torch.Generator().manual_seed(3), **kw)
    b = sample_from_logits(logits, generator=torch.Generator().manual_seed(3), **kw)
    c = sample_from_logits(logits, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = exponential_noise(logits.shape, torch.Generator().manual_seed(3))
    assert torch.equal(sample_from_logits(logits, noise=noise, **kw), a)
    with pytest.raises(ValueError, match="not both"):
        sample_from_logits(logits, noise=noise, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match="shape"):
        sample_from_logits(logits, noise=noise[..., :-1], **kw)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampler_matches_softmax_of_tempered_logits(temperature):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 20000
    draws = sample_from_logits(logits.expand(n, 5), temperature=temperature,
                               generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=5).double()
    expected = (logits / temperature).double().softmax(-1) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47  # chi-square, 4 dof, p = 0.001


def test_sampler_respects_filters():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, 2.8]).expand(5000, 5)
    g = torch.Generator().manual_seed(0)
    assert set(sample_from_logits(logits, top_k=2, generator=g).unique().tolist()) == {0, 1}
    probs = logits[0].softmax(-1)
    assert probs[[0, 1]].sum() < 0.8 < probs[[0, 1, 4]].sum()
    assert set(sample_from_logits(logits, top_p=0.8, generator=g).unique().tolist()) == {0, 1, 4}


def test_guided_logits():
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guided_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    w = torch.tensor([[1.0], [2.0], [4.0]])
    torch.testing.assert_close(guided_logits(cond, uncond, w), uncond + w * (cond - uncond))


W = 4.0


@pytest.mark.parametrize("schedule, at_0, at_half, at_1", [
    (GuidanceSchedule("constant", W), W, W, W),
    (GuidanceSchedule("linear", W), 1.0, 1 + (W - 1) / 2, W),
    (GuidanceSchedule("muse", W), 1.0, 1 + (W - 1) / 2, W),
    (GuidanceSchedule("decreasing", W), W, (W + 1) / 2, 1.0),
    (GuidanceSchedule("decreasing", W, w_min=2.0), W, 3.0, 2.0),
    (GuidanceSchedule("increasing", W, w_min=2.0), 2.0, 3.0, W),
    (GuidanceSchedule("interval", W, interval=(0.25, 0.5)), 1.0, W, 1.0),
    (GuidanceSchedule("interval", W, interval=(0.6, 1.0)), 1.0, 1.0, W),
    (GuidanceSchedule("half_linear", W), 1.0, W, W),
])
def test_schedule_weights(schedule, at_0, at_half, at_1):
    got = [schedule.weight(p) for p in (0.0, 0.5, 1.0)]
    assert got == pytest.approx([at_0, at_half, at_1])


def test_half_linear_ramps_over_first_half():
    assert GuidanceSchedule("half_linear", 3.0).weight(0.25) == pytest.approx(2.0)


def test_from_var_cfg_reproduces_var_formula():
    """VAR: (1+t)c - t u with t = cfg * si / (S-1); cfg=1.5 is w=2.5 at the last scale."""
    cfg, n_scales = 1.5, 10
    schedule = GuidanceSchedule.from_var_cfg(cfg)
    cond, uncond = torch.randn(2, 8).double(), torch.randn(2, 8).double()
    for si in range(n_scales):
        t = cfg * si / (n_scales - 1)
        var = (1 + t) * cond - t * uncond
        torch.testing.assert_close(guided_logits(cond, uncond, schedule.weight(si / (n_scales - 1))), var)
    assert schedule.weight(1.0) == pytest.approx(2.5)


def test_from_config_and_progress_range():
    settings = SamplingConfig.from_dict({"cfg": 2.0, "cfg_schedule": "interval",
                                         "cfg_interval_start": 0.0, "cfg_interval_end": 0.5})
    schedule = GuidanceSchedule.from_config(settings)
    assert schedule == GuidanceSchedule("interval", 2.0, (0.0, 0.5))
    with pytest.raises(ValueError, match="progress"):
        schedule.weight(1.5)


@pytest.mark.parametrize("overrides, field", [
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -0.1}, "temperature"),
    ({"cfg": -1.0}, "cfg"),
    ({"cfg_schedule": "cosine"}, "cfg_schedule"),
    ({"cfg_schedule": "interval", "cfg_interval_start": 0.8, "cfg_interval_end": 0.2}, "cfg_interval_end"),
    ({"cfg_schedule": "interval", "cfg_interval_start": -0.1}, "cfg_interval_start"),
    ({"cfg_interval_end": 0.5}, "cfg_interval"),
    ({"cfg_min": 2.0}, "cfg_min"),
])
def test_out_of_range_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field) as err:
        SamplingConfig.from_dict(overrides)
    assert "\n" not in str(err.value)


def test_config_message_and_round_trip():
    with pytest.raises(ConfigError, match=r"^top_p=1\.5 is out of range \(0, 1\]$"):
        SamplingConfig.from_dict({"top_p": 1.5})
    settings = SamplingConfig.from_dict({"cfg": 10.0, "cfg_schedule": "decreasing", "cfg_min": 1.5, "top_k": 5})
    assert SamplingConfig.from_dict(settings.to_dict()) == settings
    assert GuidanceSchedule.from_config(settings).weight(1.0) == 1.5
    assert math.isclose(GuidanceSchedule.from_config(SamplingConfig()).weight(0.3), 1.0)
