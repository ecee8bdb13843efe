"""Skipping non-finite updates without a host sync per step.

Whether a step's gradient norm is finite is decided on the device: a fused optimizer reads the
flag through its `found_inf` hook (the one `torch.amp.GradScaler` uses) and leaves the weights,
moments and step count alone when it is set, and the EMA and the logged sums weigh the step by it.
The host reads the flag one step late, from a pinned copy behind a CUDA event, so the GPU never
waits for it; that is where bad steps are counted, warned about and, after `max_bad` in a row,
stopped. `settle()` reads the pending flag at once (before logging or a checkpoint).
"""
from __future__ import annotations

import warnings

import torch


def plain_norm(norm: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """The gradient norm as a plain tensor (under FSDP clipping returns a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def finite_flag(norm: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """0-d bool on `device`: the gradient norm is finite (`None`: DeepSpeed before its first step)."""
    if norm is None:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.as_tensor(norm, device=device))


def arm_skip(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Make the next `optimizer.step()` a no-op on the device when `finite` is False."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if not getattr(inner, "_step_supports_amp_scaling", False):
        raise TypeError(f"{type(inner).__name__} cannot skip an update on the device; use a fused optimizer")
    inner.found_inf = (~finite).float()


class NonFiniteSteps:
    """Counts non-finite steps in a row from flags read one step late; warns, then raises after `max_bad`."""

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.bad_in_a_row = 0
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def record(self, step: int, finite: torch.Tensor, loss: torch.Tensor) -> None:
        """Note `step`'s flag and loss (copied off the device without waiting), then judge the step before it."""
        host, done = _copy_to_host(torch.stack([finite.float(), loss.detach().float()]))
        previous, self._pending = self._pending, (step, host, done)
        if previous is not None:
            self._judge(*previous)

    def settle(self) -> None:
        """Judge the pending step now."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._judge(*pending)

    def _judge(self, step: int, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        if done is not None:
            done.synchronize()
        finite, loss = bool(host[0]), float(host[1])
        if finite:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        message = f"step {step}: loss {loss:.4g}, gradient norm not finite"
        if self.bad_in_a_row >= self.max_bad:
            raise FloatingPointError(f"{message}, {self.bad_in_a_row} steps in a row; stopping (lower train.lr, "
                                     f"check the data, or resume from an earlier checkpoint)")
        warnings.warn(f"{message}: skipped the update ({self.bad_in_a_row} in a row, "
                      f"train.max_bad_steps={self.max_bad})", RuntimeWarning, stacklevel=3)


class LoggedMeans:
    """Means of the logged values (loss, gradient norm, ...) over a logging window, summed on the device
    in float32 (a bf16 loss, as FSDP's mixed precision gives, summed in bf16 would round to 0.5 near 70);
    a skipped step weighs 0, so adding a step needs no host sync, and neither does closing a window."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | int = 0

    def add(self, values: dict[str, torch.Tensor | float], finite: torch.Tensor) -> None:
        """Add one step's `values`, weighted by its finite flag."""
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=finite.device)
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(finite, value, 0.0)
        self.count = self.count + finite

    def close(self) -> "ClosedMeans":
        """End this window (its sums copied off the device without waiting) and start a new one."""
        keys = list(self.sums)
        values = torch.stack([*(self.sums[k] for k in keys), torch.as_tensor(self.count, dtype=torch.float32)]) \
            if keys else torch.zeros(1)
        self.sums, self.count = {}, 0
        return ClosedMeans(keys, *_copy_to_host(values))


def _copy_to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of `values` and, for a GPU tensor, the event after which the copy is complete."""
    if not values.is_cuda:
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class ClosedMeans:
    """A closed window of LoggedMeans; `means()` waits for its copy."""

    def __init__(self, keys: list[str], host: torch.Tensor, done: torch.cuda.Event | None):
        self.keys, self.host, self.done = keys, host, done

    def means(self) -> dict[str, float]:
        """The window's means; {} when it had no steps or only skipped ones."""
        if self.done is not None:
            self.done.synchronize()
        counted = float(self.host[-1])
        if not self.keys or not counted:
            return {}
        return {key: float(total) / counted for key, total in zip(self.keys, self.host.tolist())}
