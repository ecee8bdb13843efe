"""ODE sampling for flow-matching heads: time grids (uniform, sway), Euler and Heun, CFG, temperature.

Time convention (as in `generators.heads.flow_matching_loss`): t=0 is noise, t=1 is data, and
`velocity(x, t) -> v` is dx/dt; x arrives in float32 and `t` as a float32 tensor of shape
(B,), one entry per row of x. A sampler integrates from `temperature * x0` at t=0 to t=1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, get_args

import torch

from ..config import Config, ConfigError, check_range
from .autoregressive import ScaleLoopSampler
from .guidance import GuidanceSchedule, guided_logits
from .logits import SamplingConfig

__all__ = ["FlowSamplingConfig", "FlowSampler", "time_grid", "sway_warp", "euler_step", "heun_step", "integrate",
           "plain_field", "guided_field", "as_guidance"]

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Field = Callable[[torch.Tensor, float], torch.Tensor]
FlowSolver = Literal["euler", "heun"]
FlowSchedule = Literal["uniform", "sway"]

DEFAULT_SWAY = -1.0  # F5-TTS's inference default: steps packed towards the noise end


def sway_warp(t: torch.Tensor, sway: float) -> torch.Tensor:
    """Sway sampling (F5-TTS): t + sway * (cos(pi/2 * t) - 1 + t).

    Keeps 0 and 1 fixed and is monotone for sway in [-1, 1]; sway < 0 spends more steps near
    t=0 (noise, where the flow is most curved), sway > 0 near t=1, sway = 0 is the identity.
    """
    return t + sway * (torch.cos(math.pi / 2 * t) - 1 + t)


def time_grid(steps: int, schedule: FlowSchedule = "uniform", sway: float = DEFAULT_SWAY) -> torch.Tensor:
    """`steps + 1` increasing times (float64, CPU) from exactly 0 to exactly 1."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if schedule == "sway":
        if not -1.0 <= sway <= 1.0:
            raise ValueError(f"sway={sway} is out of range [-1, 1], where the grid is monotone")
        t = sway_warp(t, sway).clamp(0.0, 1.0)
    elif schedule != "uniform":
        raise ValueError(f"schedule={schedule!r} is not one of {list(get_args(FlowSchedule))}")
    t[0], t[-1] = 0.0, 1.0
    return t


def euler_step(field: Field, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """First order: x + h * v(x, t)."""
    return x + (t_next - t) * field(x, t)


def heun_step(field: Field, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Second order (explicit trapezoid): average v at x and at the Euler prediction for t_next."""
    h = t_next - t
    v = field(x, t)
    v_next = field(x + h * v, t_next)
    return x + 0.5 * h * (v + v_next)


SOLVERS: dict[str, Callable[[Field, torch.Tensor, float, float], torch.Tensor]] = {
    "euler": euler_step, "heun": heun_step}


def integrate(field: Field, x: torch.Tensor, times: torch.Tensor, solver: FlowSolver = "euler") -> torch.Tensor:
    """Solve dx/dt = field(x, t) over consecutive `times` (1-D) with `solver`; Heun costs 2 calls a step."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {list(SOLVERS)}")
    step = SOLVERS[solver]
    grid = times.tolist()
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = step(field, x, t, t_next)
    return x


def plain_field(velocity: VelocityFn) -> Field:
    """Adapt `velocity(x, t_rows)` to a field of a float time; the state is float32."""
    def field(x: torch.Tensor, t: float) -> torch.Tensor:
        return velocity(x, torch.full((x.shape[0],), t, device=x.device)).float()
    return field


def guided_field(velocity: VelocityFn, guidance: GuidanceSchedule) -> Field:
    """CFG on a doubled batch: `velocity` sees [x; x] (conditional rows, then unconditional rows)
    and the field is `uncond + w * (cond - uncond)` with w = `guidance.weight(t)` (flow time)."""
    doubled = plain_field(velocity)

    def field(x: torch.Tensor, t: float) -> torch.Tensor:
        cond, uncond = doubled(torch.cat([x, x]), t).chunk(2)
        return guided_logits(cond, uncond, guidance.weight(t))
    return field


def as_guidance(cfg: float | GuidanceSchedule) -> GuidanceSchedule:
    """A constant schedule for a plain weight w; schedules pass through."""
    return cfg if isinstance(cfg, GuidanceSchedule) else GuidanceSchedule("constant", cfg)


@dataclasses.dataclass
class FlowSamplingConfig(Config):
    """ODE settings for flow heads. FlowAR: Euler, 25 steps (S/L; 50 for H), uniform grid.

    `sway` is the sway-sampling coefficient, used when `schedule` is "sway" (in [-1, 1]);
    `temperature` scales the initial noise x0 (MAR-style; 0 starts every sample at the mean).
    """

    steps: int = 25
    solver: FlowSolver = "euler"
    schedule: FlowSchedule = "uniform"
    sway: float = DEFAULT_SWAY
    temperature: float = 1.0
    cfg_interval_start: float = 0.0  # guidance only for flow time in [start, end]; 1 outside
    cfg_interval_end: float = 1.0

    def guidance(self, weight: float) -> float | GuidanceSchedule:
        """Weight w along the flow: constant, or restricted to the guidance interval."""
        interval = (self.cfg_interval_start, self.cfg_interval_end)
        return weight if interval == (0.0, 1.0) else GuidanceSchedule("interval", weight, interval)

    def validate(self) -> None:
        check_range("steps", self.steps, 1, math.inf)
        if self.solver not in get_args(FlowSolver):
            raise ConfigError(f"solver={self.solver!r} is not one of {list(get_args(FlowSolver))}")
        if self.schedule not in get_args(FlowSchedule):
            raise ConfigError(f"schedule={self.schedule!r} is not one of {list(get_args(FlowSchedule))}")
        check_range("sway", self.sway, -1.0, 1.0)
        check_range("temperature", self.temperature, 0.0, math.inf)
        check_range("cfg_interval_start", self.cfg_interval_start, 0.0, 1.0)
        check_range("cfg_interval_end", self.cfg_interval_end, self.cfg_interval_start, 1.0)


class FlowSampler:
    """Integrates a velocity function from noise (t=0) to data (t=1) with the configured solver and grid.

    `cfg` is a standard guidance weight w (1 = none) or a `GuidanceSchedule` evaluated on the
    flow time (e.g. guidance only on part of the path: `GuidanceSchedule("interval", w, (0.0, 0.9))`). When
    `is_guided(cfg)`, the velocity function is called on the doubled batch and must condition
    its first half on the condition and its second half on the null condition.
    """

    def __init__(self, settings: FlowSamplingConfig):
        settings.validate()
        self.settings = settings
        self.times = time_grid(settings.steps, settings.schedule, settings.sway)

    def is_guided(self, cfg: float | GuidanceSchedule) -> bool:
        """Whether any step uses w != 1, i.e. whether the velocity function gets a doubled batch."""
        schedule = as_guidance(cfg)
        return any(schedule.weight(t) != 1.0 for t in self.times.tolist())

    @torch.no_grad()
    def __call__(self, velocity: VelocityFn, x0: torch.Tensor, cfg: float | GuidanceSchedule = 1.0) -> torch.Tensor:
        """Sample from standard-normal `x0` (B, ...): returns x at t=1, in x0's dtype."""
        field = guided_field(velocity, as_guidance(cfg)) if self.is_guided(cfg) else plain_field(velocity)
        x = integrate(field, self.settings.temperature * x0.float(), self.times, self.settings.solver)
        return x.to(x0.dtype)


class FlowScaleSampler(ScaleLoopSampler):
    """FlowAR sampling: scale by scale (KV-cached trunk), each scale's latent vectors generated from
    noise by the flow head with `flow` (steps, solver, time grid, temperature, guidance interval).

    The CFG weight of scale k follows `settings`' schedule over scales (FlowAR ramps it linearly:
    cfg_schedule=linear); along the flow it applies inside `flow`'s guidance interval of flow time
    (all of it by default). `settings.seed` seeds the noise. Returns the final (B, C, H, W)
    latent; `on_scale(k, latent_k)` sees every scale's map.
    """

    def __init__(self, settings: SamplingConfig, flow: FlowSamplingConfig | None = None, use_cache: bool = True,
                 on_scale=None):
        super().__init__(settings, use_cache, on_scale)
        self.flow_settings = flow or FlowSamplingConfig()
        self.flow = FlowSampler(self.flow_settings)

    def noise(self, model, k: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((batch, model.sizes[k], model.latent_channels), generator=generator,
                           device=generator.device)

    def emit(self, model, hidden: torch.Tensor, k: int, weight: float, guided: bool,
             noise: torch.Tensor) -> torch.Tensor:
        if not (guided and weight != 1.0):
            hidden, weight = hidden[:noise.shape[0]], 1.0

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.head(x.to(hidden.dtype), t.to(hidden.dtype), hidden)
        return self.flow(velocity, noise, cfg=self.flow_settings.guidance(weight))

    @torch.no_grad()
    def __call__(self, model, cond) -> torch.Tensor:
        units = self.run(model, cond)
        return model.add_scale(None, units[-1], len(units) - 1)
