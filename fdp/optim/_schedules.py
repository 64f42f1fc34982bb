"""Learning-rate schedules: pure functions of the step count.

A schedule maps the step count (an int, or a 0-d integer tensor such as an optimizer state's
``count``) to a learning rate: a Python float for an int, a 0-d float64 tensor for a tensor, so the
same schedule runs eagerly, under ``torch.func.vmap`` and under ``torch.compile``. Any optimizer
accepts a schedule as ``learning_rate``; update ``k`` (counting from 0) uses ``schedule(k)``,
which is what ``torch.optim.lr_scheduler`` gives when ``scheduler.step()`` follows each
``optimizer.step()``.

Counterparts: :func:`step_schedule` is ``StepLR``; :func:`cosine_decay_schedule` is
``CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * init_value)`` up to ``decay_steps`` (then it
stays at the end value, as in optax); :func:`linear_schedule` is ``LinearLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fdp import _check
from fdp._compat import compiling, is_functorch_wrapped
from fdp.optim import _base

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "linear_schedule",
    "linear_warmup_schedule",
    "step_schedule",
    "warmup_cosine_decay_schedule",
]

Schedule = Callable[[Any], Any]
"""``schedule(step: int | Tensor) -> float | Tensor``."""

_Formula = Callable[[torch.Tensor], torch.Tensor]


def _schedule(formula: _Formula, name: str) -> Schedule:
    """Wraps a float64-tensor formula into a schedule taking an int or a tensor step."""

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return formula(step.to(torch.float64))
        if not _check.is_int(step):
            raise TypeError(f"{name}: step must be an int or a tensor, got {step!r}")
        if step < 0:
            raise ValueError(f"{name}: step must be >= 0, got {step}")
        return formula(torch.tensor(float(step), dtype=torch.float64)).item()

    schedule.__name__ = schedule.__qualname__ = name
    return schedule


def _steps(value: Any, fn: str, name: str, minimum: int = 1) -> int:
    if not _check.is_int(value):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def constant_schedule(value: float) -> Schedule:
    """The same learning rate at every step.

    Example:
        >>> fdp.optim.constant_schedule(0.1)(7)
        0.1
    """
    v = _base.number(value, "constant_schedule", "value")
    return _schedule(lambda t: torch.full_like(t, v), "constant_schedule")


def step_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** (step // step_size)``, as ``torch.optim.lr_scheduler.StepLR``.

    Example:
        >>> s = fdp.optim.step_schedule(1.0, step_size=2, gamma=0.5)
        >>> [s(k) for k in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    fn = "step_schedule"
    v = _base.number(init_value, fn, "init_value")
    size = _steps(step_size, fn, "step_size")
    g = _base.nonnegative(gamma, fn, "gamma")
    return _schedule(lambda t: v * g ** torch.div(t, size, rounding_mode="floor"), fn)


def _cosine(v: float, decay_steps: int, alpha: float, exponent: float) -> _Formula:
    def formula(t: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(t, max=decay_steps) / decay_steps
        decay = (0.5 * (1 + torch.cos(math.pi * frac))) ** exponent
        return v * ((1 - alpha) * decay + alpha)

    return formula


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` (optax).

    Equals ``CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * init_value)`` for steps up to
    ``decay_steps``; afterwards it stays at ``alpha * init_value``.

    Example:
        >>> s = fdp.optim.cosine_decay_schedule(1.0, decay_steps=4)
        >>> [round(s(k), 4) for k in range(6)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    fn = "cosine_decay_schedule"
    v = _base.number(init_value, fn, "init_value")
    steps = _steps(decay_steps, fn, "decay_steps")
    a = _base.number(alpha, fn, "alpha")
    e = _base.nonnegative(exponent, fn, "exponent")
    return _schedule(_cosine(v, steps, a, e), fn)


def _linear(init: float, end: float, steps: int, begin: int) -> _Formula:
    def formula(t: torch.Tensor) -> torch.Tensor:
        done = torch.clamp(t - begin, 0, steps)
        return (init - end) * (1 - done / steps) + end

    return formula


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps`` steps (optax).

    Constant ``init_value`` before ``transition_begin`` and ``end_value`` after the transition.
    With base lr ``b``, equals ``LinearLR(start_factor=init_value / b, end_factor=end_value / b,
    total_iters=transition_steps)``.

    Example:
        >>> s = fdp.optim.linear_schedule(1.0, 0.0, transition_steps=4)
        >>> [s(k) for k in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    fn = "linear_schedule"
    i = _base.number(init_value, fn, "init_value")
    e = _base.number(end_value, fn, "end_value")
    steps = _steps(transition_steps, fn, "transition_steps")
    begin = _steps(transition_begin, fn, "transition_begin", minimum=0)
    return _schedule(_linear(i, e, steps, begin), fn)


def linear_warmup_schedule(
    peak_value: float, warmup_steps: int, init_value: float = 0.0
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant.

    Equals ``LinearLR(start_factor=init_value / peak_value, total_iters=warmup_steps)`` on a base
    lr of ``peak_value``.

    Example:
        >>> s = fdp.optim.linear_warmup_schedule(1.0, warmup_steps=4)
        >>> [s(k) for k in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    fn = "linear_warmup_schedule"
    p = _base.number(peak_value, fn, "peak_value")
    steps = _steps(warmup_steps, fn, "warmup_steps")
    i = _base.number(init_value, fn, "init_value")
    return _schedule(_linear(i, p, steps, 0), fn)


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value`` (optax semantics).

    ``decay_steps`` counts the warmup too: the cosine part lasts ``decay_steps - warmup_steps``.

    Example:
        >>> s = fdp.optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
        >>> [s(k) for k in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    fn = "warmup_cosine_decay_schedule"
    i = _base.number(init_value, fn, "init_value")
    p = _base.number(peak_value, fn, "peak_value")
    warmup = _steps(warmup_steps, fn, "warmup_steps", minimum=0)
    total = _steps(decay_steps, fn, "decay_steps")
    if total <= warmup:
        raise ValueError(f"{fn}: decay_steps ({total}) must exceed warmup_steps ({warmup}); "
                         f"decay_steps counts the warmup steps too")
    e = _base.number(end_value, fn, "end_value")
    x = _base.nonnegative(exponent, fn, "exponent")
    alpha = 0.0 if p == 0.0 else e / p
    cosine = _cosine(p, total - warmup, alpha, x)
    if warmup == 0:
        return _schedule(cosine, fn)
    warm = _linear(i, p, warmup, 0)
    return _schedule(lambda t: torch.where(t < warmup, warm(t), cosine(t - warmup)), fn)


# --- learning rates inside the optimizers -----------------------------------------------------

def check_learning_rate(learning_rate: Any, fn: str) -> None:
    """A learning rate is a float >= 0 or a schedule (a callable of the step count)."""
    if callable(learning_rate):
        return
    if not _check.is_number(learning_rate):
        raise TypeError(
            f"{fn}: learning_rate must be a float or a schedule (a callable of the step count), "
            f"got {type(learning_rate).__name__}; e.g. learning_rate=0.1 or "
            f"fdp.optim.cosine_decay_schedule(0.1, 1000)"
        )
    _base.nonnegative(learning_rate, fn, "learning_rate")


def learning_rate_at(learning_rate: Any, count: torch.Tensor, fn: str) -> float | torch.Tensor:
    """The learning rate for the update whose step count (before it) is ``count``.

    A schedule's value is checked for finiteness eagerly; not under ``torch.compile`` or when the
    value is batched by ``torch.func`` (it cannot be read there without a data-dependent branch).
    """
    if not callable(learning_rate):
        return float(learning_rate)
    lr = learning_rate(count)
    if isinstance(lr, torch.Tensor):
        if lr.dim() != 0:
            raise ValueError(f"{fn}: the learning_rate schedule returned shape "
                             f"{tuple(lr.shape)}; a schedule must return a float or a 0-d tensor")
        if compiling() or is_functorch_wrapped(lr):
            return lr
        bad = not bool(torch.isfinite(lr)) or bool(lr < 0)
    elif _check.is_number(lr):
        bad = not math.isfinite(lr) or lr < 0
    else:
        raise TypeError(f"{fn}: the learning_rate schedule returned a {type(lr).__name__}; "
                        f"a schedule must return a float or a 0-d tensor")
    if bad:
        step = count if is_functorch_wrapped(count) else count.tolist()
        raise ValueError(
            f"{fn}: the learning_rate schedule returned {lr} at step {step}; a schedule must "
            f"return finite, non-negative values (check its parameters, e.g. a zero division)"
        )
    return lr
