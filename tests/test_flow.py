"""Flow-matching head, loss and ODE samplers: grids, solver accuracy, CFG, a tiny trained head."""
from __future__ import annotations

import math

import pytest
import torch

from tessera.config import ConfigError
from tessera.generators.heads import FlowHead, flow_matching_loss, sample_flow_times
from tessera.samplers.flow import FlowSampler, FlowSamplingConfig, guided_field, integrate, plain_field, time_grid
from tessera.samplers.guidance import GuidanceSchedule

MU, SIGMA = 2.0, 0.5  # data N(MU, SIGMA^2) for the analytic Gaussian-to-Gaussian flow


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Marginal velocity of x_t = t x1 + (1 - t) x0, x1 ~ N(MU, SIGMA^2): curved, x(1) = MU + SIGMA x(0)."""
    t = t[:, None]
    std = torch.sqrt((t * SIGMA) ** 2 + (1 - t) ** 2)
    dstd = (t * SIGMA ** 2 - (1 - t)) / std
    return MU + dstd / std * (x - t * MU)


def settings(**kw) -> FlowSamplingConfig:
    return FlowSamplingConfig.from_dict(kw)


@pytest.mark.parametrize("schedule, sway", [("uniform", 0.0), ("sway", -1.0), ("sway", -0.5), ("sway", 1.0)])
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_time_grid_monotone_with_exact_endpoints(schedule, sway, steps):
    t = time_grid(steps, schedule, sway)
    assert t.shape == (steps + 1,)
    assert t[0].item() == 0.0 and t[-1].item() == 1.0
    assert (t.diff() > 0).all()


def test_negative_sway_packs_steps_near_noise():
    uniform, swayed = time_grid(10), time_grid(10, "sway", -1.0)
    assert swayed[1] < uniform[1] and swayed.diff()[-1] > uniform.diff()[-1]
    assert torch.equal(time_grid(10, "sway", 0.0), uniform)


@pytest.mark.parametrize("schedule", ["uniform", "sway"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_is_exact_on_the_straight_flow_to_a_point(schedule, steps):
    x1 = torch.tensor([[1.5, -0.5]])

    def to_point(x, t):  # along x_t = x0 + t (x1 - x0) this is the constant x1 - x0 (never called at t=1)
        return (x1 - x) / (1 - t[:, None])

    x0 = torch.randn(4, 2)
    out = FlowSampler(settings(steps=steps, schedule=schedule))(to_point, x0)
    torch.testing.assert_close(out, x1.expand(4, 2), atol=1e-5, rtol=0)


def test_heun_beats_euler_on_a_curved_flow():
    x0 = torch.randn(64, 1, dtype=torch.float64)
    exact = MU + SIGMA * x0
    field = plain_field(gaussian_velocity)

    def error(solver: str, steps: int) -> float:
        out = integrate(field, x0.float(), time_grid(steps), solver)
        return (out.double() - exact).abs().max().item()

    assert error("euler", 2000) < 2e-3
    assert error("heun", 10) < 1e-2
    assert error("heun", 10) < 0.1 * error("euler", 10)


def test_sampler_temperature_scales_the_noise():
    x0 = torch.randn(8, 3)
    out = FlowSampler(settings(steps=3, temperature=0.5))(lambda x, t: torch.zeros_like(x), x0)
    torch.testing.assert_close(out, 0.5 * x0)


def test_cfg_doubles_the_batch_with_cond_rows_first():
    seen = []

    def halves(x, t):  # cond rows move by +1 per unit time, uncond rows by -1
        seen.append(x.shape[0])
        b = x.shape[0] // 2
        return torch.cat([torch.ones(b, 2), -torch.ones(b, 2)])

    x0 = torch.randn(3, 2)
    sampler = FlowSampler(settings(steps=4))
    out = sampler(halves, x0, cfg=3.0)
    torch.testing.assert_close(out, x0 + (-1 + 3.0 * 2))  # uncond + w (cond - uncond)
    assert set(seen) == {6} and sampler.is_guided(3.0) and not sampler.is_guided(1.0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_cfg_weight_one_equals_the_unguided_path(solver):
    x0 = torch.randn(5, 1)
    times = time_grid(6, "sway", -0.8)
    plain = integrate(plain_field(gaussian_velocity), x0, times, solver)
    doubled = integrate(guided_field(gaussian_velocity, GuidanceSchedule("constant", 1.0)), x0, times, solver)
    assert torch.equal(plain, doubled)
    calls = []
    FlowSampler(settings(steps=6, solver=solver))(lambda x, t: calls.append(x.shape[0]) or x, x0, cfg=1.0)
    assert set(calls) == {5}


def test_cfg_schedule_on_flow_time():
    sampler = FlowSampler(settings(steps=4))
    assert sampler.is_guided(GuidanceSchedule("interval", 2.0, (0.0, 0.5)))
    assert not sampler.is_guided(GuidanceSchedule("interval", 1.0, (0.0, 0.5)))


def test_flow_head_is_zero_and_identity_at_init():
    head = FlowHead(latent_dim=4, cond_dim=6, width=32, depth=3)
    x, cond = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    assert torch.equal(head(x, torch.rand(2), cond), torch.zeros_like(x))
    h, y = torch.randn(10, 1, 32), torch.randn(10, 32)
    for block in head.blocks:
        assert torch.equal(block(h, y), h)
    assert all((p == 0).all() for b in head.blocks for p in b.ada.parameters())


def test_flow_head_flattens_any_leading_shape():
    head = FlowHead(latent_dim=4, cond_dim=6, width=32, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, cond, t = torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.rand(2)
    flat = head(x.reshape(10, 4), t.repeat_interleave(5), cond.reshape(10, 6))
    torch.testing.assert_close(head(x, t, cond), flat.reshape(2, 5, 4))
    torch.testing.assert_close(head(x, 0.3, cond), head(x, torch.full((2, 5), 0.3), cond))


def test_flow_matching_loss_convention():
    head = FlowHead(latent_dim=3, cond_dim=2, width=16, depth=1)  # outputs zero at init
    x1, x0, cond, t = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2), torch.rand(4)
    loss, logs = flow_matching_loss(head, x1, cond, t=t, noise=x0)
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean())
    assert logs["flow_mse"] == loss
    times = sample_flow_times((1000,), "logit_normal")
    assert ((times > 0) & (times < 1)).all() and abs(times.mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="t_sampling"):
        flow_matching_loss(head, x1, cond, t_sampling="beta")


def test_flow_head_learns_a_conditional_toy_distribution():
    targets = torch.tensor([[2.0, 2.0], [-2.0, 1.0]])
    head = FlowHead(latent_dim=2, cond_dim=2, width=64, depth=2)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        label = torch.randint(0, 2, (256,))
        x1 = targets[label] + 0.05 * torch.randn(256, 2)
        loss, _ = flow_matching_loss(head, x1, torch.eye(2)[label])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.2 * sum(losses[:20])

    label = torch.tensor([0] * 64 + [1] * 64)
    cond = torch.eye(2)[label]
    sampler = FlowSampler(settings(steps=20, solver="heun", schedule="sway"))
    out = sampler(lambda x, t: head(x, t, cond), torch.randn(128, 2))
    distance = (out - targets[label]).norm(dim=-1)
    assert distance.median() < 0.3 and (distance < 0.5).float().mean() > 0.9


@pytest.mark.parametrize("overrides, field", [
    ({"steps": 0}, "steps"),
    ({"solver": "rk4"}, "solver"),
    ({"schedule": "cosine"}, "schedule"),
    ({"sway": 1.5}, "sway"),
    ({"sway": -1.1}, "sway"),
    ({"temperature": -0.1}, "temperature"),
    ({"cfg_interval_start": 0.5, "cfg_interval_end": 0.2}, "cfg_interval_end"),
    ({"cfg_interval_end": 1.5}, "cfg_interval_end"),
])
def test_bad_flow_config_raises(overrides, field):
    with pytest.raises(ConfigError, match=field):
        FlowSamplingConfig.from_dict(overrides)
    with pytest.raises(ConfigError, match=field):
        FlowSampler(FlowSamplingConfig(**overrides))


def test_flow_config_defaults_and_round_trip():
    config = FlowSamplingConfig()
    assert (config.steps, config.solver, config.schedule) == (25, "euler", "uniform")
    tuned = settings(steps=8, solver="heun", schedule="sway", sway=-0.5, temperature=0.9)
    assert FlowSamplingConfig.from_dict(tuned.to_dict()) == tuned
    assert math.isclose(FlowSamplingConfig.from_dict({"sway": -1}).sway, -1.0)
