"""Masked decoding (MaskGIT for images, MAGNeT for multi-stream audio): predict every masked token,
keep the most confident, re-mask the rest on a schedule.

Two temperatures, scheduled separately: `SamplingConfig.temperature` for drawing tokens
(`temperature_anneal="linear"`: times (1 - t/T), MAGNeT) and `choice_temperature` for the Gumbel
noise on the re-masking confidence (`choice_anneal="linear"`: times (1 - (t+1)/T), MaskGIT). CFG
runs as a doubled batch with the shared `GuidanceSchedule` evaluated at progress = 1 - (masked
fraction before the step): `decreasing` anneals with the mask rate as MAGNeT does, `increasing`
ramps up as ENAT does. Positions known from the start (a prompt, an AR prefix) never change.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, check_range
from ..generators.conditioning import condition_size
from ..generators.masking import MaskSchedule, masked_after_step
from .autoregressive import compile_step, doubled_condition
from .logits import GuidanceSchedule, SamplingConfig, exponential_noise, guided_logits, top_k_filter, top_p_filter

Anneal = Literal["constant", "linear"]
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (B, N), weights (B,)) -> logits (B, N, V)
Rescore = Callable[[torch.Tensor], torch.Tensor]  # candidate tokens (B, N) -> log-probs (B, N) of those tokens
StepCallback = Callable[[int, torch.Tensor], None]


@dataclasses.dataclass
class MaskedSamplingConfig(Config):
    """Decoding knobs of masked generators (defaults: MaskGIT; `magnet()` gives MAGNeT's)."""

    steps: int = 12  # MaskGIT: steps over the whole image
    stage_steps: list[int] = dataclasses.field(default_factory=lambda: [20, 10, 10, 10])  # MAGNeT: per stream
    schedule: MaskSchedule = "cosine"
    temperature_anneal: Anneal = "constant"
    choice_temperature: float = 4.5  # Gumbel scale on the re-mask confidence (0: deterministic)
    choice_anneal: Anneal = "linear"
    span: int = 1  # re-mask units of `span` frames (MAGNeT: 3), scored by their most confident token
    rescore_weight: float = 0.0  # w in (1 - w) log p_model + w log p_rescorer, with a rescorer

    def validate(self) -> None:
        check_range("steps", self.steps, 1)
        if not self.stage_steps or min(self.stage_steps) < 1:
            raise ConfigError(f"stage_steps={self.stage_steps} must list at least one step count >= 1")
        if self.schedule not in get_args(MaskSchedule):
            raise ConfigError(f"schedule={self.schedule!r} is not one of {list(get_args(MaskSchedule))}")
        for name in ("temperature_anneal", "choice_anneal"):
            if getattr(self, name) not in get_args(Anneal):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {list(get_args(Anneal))}")
        check_range("choice_temperature", self.choice_temperature, 0.0)
        check_range("span", self.span, 1)
        check_range("rescore_weight", self.rescore_weight, 0.0, 1.0)

    @classmethod
    def magnet(cls, **overrides) -> "MaskedSamplingConfig":
        """audiocraft MAGNeT's decoding: 20/10/10/10 steps, spans of 3, linear temperature, no Gumbel."""
        return cls(**{"temperature_anneal": "linear", "choice_temperature": 0.0, "span": 3, **overrides})


def _annealed(value: float, anneal: Anneal, progress: float) -> float:
    return value * (1.0 - progress) if anneal == "linear" else value


def _unit_view(x: torch.Tensor, span: int, fill: float | bool) -> torch.Tensor:
    """(B, N) -> (B, ceil(N / span), span), padding the last unit with `fill`."""
    pad = -x.shape[1] % span
    return F.pad(x, (0, pad), value=fill).view(x.shape[0], -1, span)


def _to_positions(units: torch.Tensor, span: int, n: int) -> torch.Tensor:
    return units.repeat_interleave(span, 1)[:, :n]


@torch.no_grad()
def masked_decode(predict: Predict, tokens: torch.Tensor, mask_id: int, steps: int, sampling: SamplingConfig,
                  masked: MaskedSamplingConfig, guidance: GuidanceSchedule, generator: torch.Generator,
                  rescore: Rescore | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """Fill the `mask_id` positions of `tokens` (B, N) in `steps` steps; returns the filled tokens.

    After step t, floor(U0 * gamma((t + 1) / steps)) of a row's U0 initially unknown units (spans
    of `masked.span` positions) are masked again: those with the lowest confidence (log-probability
    of the drawn token, the unit's best, plus annealed Gumbel noise). A row without unknown
    positions is returned unchanged.
    """
    tokens = tokens.clone()
    b, n = tokens.shape
    span = masked.span
    unknown0 = _unit_view(tokens == mask_id, span, False).any(-1).sum(1)
    for t in range(steps):
        masked_now = tokens == mask_id
        rate = masked_now.float().sum(1) / masked_now.shape[1]
        weights = torch.tensor([guidance.weight(1.0 - r) for r in rate.tolist()], device=tokens.device)
        logits = predict(tokens, weights).float()
        temperature = max(_annealed(sampling.temperature, masked.temperature_anneal, t / steps), 1e-2)
        logits = top_p_filter(top_k_filter(logits / temperature, sampling.top_k), sampling.top_p)
        noise = exponential_noise(logits.shape, generator, tokens.device)
        drawn = (logits.softmax(-1) / noise).argmax(-1)
        drawn = torch.where(masked_now, drawn, tokens)
        confidence = logits.log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
        if rescore is not None and masked.rescore_weight > 0:
            confidence = torch.lerp(confidence, rescore(drawn).float(), masked.rescore_weight)
        choice = _annealed(masked.choice_temperature, masked.choice_anneal, (t + 1) / steps)
        if choice > 0:
            uniform = torch.rand(confidence.shape, generator=generator, device=tokens.device)
            confidence = confidence + choice * -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
        confidence = confidence.masked_fill(~masked_now, math.inf)
        unit_conf = _unit_view(confidence, span, -math.inf).max(-1).values
        unit_masked = _unit_view(masked_now, span, False).any(-1)
        unit_conf = unit_conf.masked_fill(~unit_masked, math.inf)
        keep_masked = masked_after_step(masked.schedule, unknown0, t, steps)
        remask_units = unit_conf.argsort(1).argsort(1) < keep_masked[:, None]
        remask = _to_positions(remask_units, span, n) & masked_now
        tokens = torch.where(remask, torch.full_like(drawn, mask_id), drawn)
        if on_step is not None:
            on_step(t, tokens)
    return tokens


def masked_logits(model, prefix: torch.Tensor, tokens: torch.Tensor, stage: int | None) -> torch.Tensor:
    """A masked generator's logits: every position (MaskGIT, `stage=None`) or stream `stage` (MAGNeT)."""
    return model.masked_logits(prefix, tokens) if stage is None else model.stage_logits(prefix, tokens, stage)


class MaskedSampler:
    """MaskGIT decoding of a masked image generator: all tokens start masked (or `init` fixes some).

    `compile=True` (CUDA) runs the model's forward pass through torch.compile with CUDA-graph replay
    (one graph per model, batch size and stream); the confidence ranking and re-masking stay eager.
    """

    def __init__(self, settings: SamplingConfig, masked: MaskedSamplingConfig | None = None,
                 on_step: StepCallback | None = None, compile: bool = False):
        self.settings = settings
        self.masked = masked or MaskedSamplingConfig()
        self.guidance = GuidanceSchedule.from_config(settings)
        self.on_step = on_step
        self.logits = compile_step(masked_logits, graphs=32) if compile else masked_logits

    def guided_predict(self, model, cond, inputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       stage: int | None = None) -> Predict:
        """`predict` for `masked_decode`: the model's logits for `inputs(tokens)` (default: the tokens),
        on a doubled batch when guided."""
        guided = model.has_condition and any(self.guidance.weight(p / 10) != 1.0 for p in range(11))
        prefix = doubled_condition(model, cond, guided, model.prefix_embeddings)

        def logits(tokens: torch.Tensor) -> torch.Tensor:
            return self.logits(model, prefix, inputs(tokens) if inputs is not None else tokens, stage)

        def predict(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            if not guided:
                return logits(tokens)
            cond_logits, uncond_logits = logits(torch.cat([tokens, tokens])).chunk(2)
            return guided_logits(cond_logits.float(), uncond_logits.float(), weights.view(-1, *[1] * (tokens.dim())))
        return predict

    @torch.no_grad()
    def __call__(self, model, cond, init: torch.Tensor | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = condition_size(cond)
        tokens = init if init is not None else \
            torch.full((batch, model.n_tokens), model.mask_id, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(self.settings.seed)
        predict = self.guided_predict(model, cond)
        return masked_decode(predict, tokens, model.mask_id, self.masked.steps, self.settings, self.masked,
                             self.guidance, generator, on_step=self.on_step)


class StreamMaskedSampler(MaskedSampler):
    """MAGNeT decoding: stream k (coarse to fine) is decoded in `stage_steps[k]` steps with streams
    < k fixed and streams > k masked; `rescorer(codes, k, cond)` (optional, e.g. `ARRescorer`) gives
    an external model's log-probs (B, T) of stream k in candidate codes, mixed in by `rescore_weight`; `init` (B, K, T)
    fixes known frames (e.g. an autoregressive prefix: hybrid decoding). `on_step(k, codes)` sees
    the codes after every step of every stream."""

    def __init__(self, settings: SamplingConfig, masked: MaskedSamplingConfig | None = None,
                 on_step: StepCallback | None = None,
                 rescorer: Callable[[torch.Tensor, int, object], torch.Tensor] | None = None, compile: bool = False):
        super().__init__(settings, masked or MaskedSamplingConfig.magnet(), on_step, compile)
        self.rescorer = rescorer

    @torch.no_grad()
    def __call__(self, model, cond, init: torch.Tensor | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = condition_size(cond)
        k_streams = model.num_streams
        if len(self.masked.stage_steps) < k_streams:
            raise ConfigError(f"stage_steps={self.masked.stage_steps} needs one step count per stream ({k_streams})")
        codes = init.clone() if init is not None else \
            torch.full((batch, k_streams, model.frames), model.mask_id, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(self.settings.seed)
        for k in range(k_streams):
            def with_stream(tokens: torch.Tensor, k: int = k) -> torch.Tensor:
                full = codes.repeat(tokens.shape[0] // codes.shape[0], 1, 1)
                full[:, k] = tokens
                return full

            predict = self.guided_predict(model, cond, with_stream, stage=k)
            rescore = (lambda tokens, k=k: self.rescorer(with_stream(tokens), k, cond)) if self.rescorer else None
            codes[:, k] = masked_decode(predict, codes[:, k], model.mask_id, self.masked.stage_steps[k], self.settings,
                                        self.masked, self.guidance, generator, rescore,
                                        on_step=(lambda t, tok, k=k: self.on_step(k, with_stream(tok)))
                                        if self.on_step else None)
        return codes


class ARRescorer:
    """Model rescoring (MAGNeT paper, never released by audiocraft): an autoregressive multi-stream
    model on the same codec scores candidate codes by teacher forcing. Streams not decoded yet
    (the masked generator's mask id) are given to it as its own empty-slot token."""

    def __init__(self, ar_model, mask_id: int):
        self.ar = ar_model
        self.mask_id = mask_id

    def __call__(self, codes: torch.Tensor, k: int, cond) -> torch.Tensor:
        keep = torch.zeros(condition_size(cond), dtype=torch.bool, device=codes.device)
        prefix = self.ar.prefix_embeddings(cond, keep)
        codes = codes.masked_fill(codes == self.mask_id, self.ar.special)
        return self.ar.code_log_probs(prefix, codes)[:, k]


class HybridSampler:
    """Hybrid-MAGNeT: the first `seconds` of every stream generated autoregressively by `ar_model`
    (a multi-stream next-token model on the same codec, with `ar_sampler`), the rest by masked
    decoding with that prefix held fixed."""

    def __init__(self, masked_sampler: StreamMaskedSampler, ar_model, ar_sampler, seconds: float):
        self.masked_sampler = masked_sampler
        self.ar, self.ar_sampler, self.seconds = ar_model, ar_sampler, seconds

    @torch.no_grad()
    def __call__(self, model, cond) -> torch.Tensor:
        if self.seconds >= model.frames / model.tokenizer.frame_rate:
            raise ConfigError(f"--hybrid-seconds={self.seconds} leaves nothing for masked decoding of a "
                              f"{model.frames / model.tokenizer.frame_rate:.2f} s clip")
        self.ar.set_duration(self.seconds)
        head = self.ar.units_to_codes(self.ar_sampler(self.ar, cond))
        init = torch.full((head.shape[0], model.num_streams, model.frames), model.mask_id, dtype=torch.long,
                          device=head.device)
        init[:, :, : head.shape[-1]] = head
        return self.masked_sampler(model, cond, init=init)
