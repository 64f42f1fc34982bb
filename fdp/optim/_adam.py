"""Adam (L2 weight decay added to the gradient) and AdamW (decoupled weight decay)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fdp.optim import _base, _schedules
from fdp.optim._base import EmptyState, GradientTransformation, PyTree
from fdp.optim._into import NO_INTO, Into
from fdp.optim._native import native

__all__ = ["AdamState", "adam", "adamw"]


class AdamState(NamedTuple):
    """State of :func:`adam` / :func:`adamw`.

    Attributes:
        count: number of updates done, a 0-d int64 tensor.
        mu: first-moment running averages (``exp_avg`` in torch).
        nu: second-moment running averages (``exp_avg_sq``).
        nu_max: running maximum of ``nu`` with ``amsgrad=True`` (``max_exp_avg_sq``), else
            ``EmptyState()`` (a tree with no leaves).
        steps: the updates each parameter received (int64, one entry per leaf in the
            params' leaf order): torch.optim's per-parameter ``step``, for the bias
            correction of a parameter that had no gradient on some steps. ``None`` (a state
            built by hand) counts ``count`` for every parameter.
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's field name shadows tuple.count
    mu: PyTree
    nu: PyTree
    nu_max: PyTree
    steps: torch.Tensor | None = None


def _adam(
    fn: str,
    learning_rate: float | _schedules.Schedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled: bool,
) -> GradientTransformation:
    _schedules.check_learning_rate(learning_rate, fn)
    b1 = _base.unit_interval(b1, fn, "b1")
    b2 = _base.unit_interval(b2, fn, "b2")
    eps = _base.nonnegative(eps, fn, "eps")
    wd = _base.nonnegative(weight_decay, fn, "weight_decay")
    if not isinstance(amsgrad, bool):
        raise TypeError(f"{fn}: amsgrad must be a bool, got {type(amsgrad).__name__}")

    def init(params: PyTree) -> AdamState:
        leaves = _base.float_params(params, f"{fn}.init")

        def zeros() -> PyTree:
            return _base.unflatten_like([torch.zeros_like(p) for p in leaves], params)

        nu_max = zeros() if amsgrad else EmptyState()
        count = _base.step_count(leaves)
        steps = torch.zeros(len(leaves), dtype=torch.int64, device=count.device)
        return AdamState(count, zeros(), zeros(), nu_max, steps)

    def update(
        grads: PyTree, state: AdamState, params: PyTree | None = None, *,
        _into: Into | None = None,
    ) -> tuple[PyTree, AdamState]:
        where = f"{fn}.update"
        g_leaves, p_leaves = _base.update_inputs(where, fn, state, AdamState, grads, params, wd)
        mu = _base.state_leaves(where, state.mu, "state.mu", grads, params=params)
        nu = _base.state_leaves(where, state.nu, "state.nu", grads, params=params)
        nu_max = _base.state_leaves(where, state.nu_max, "state.nu_max", grads, amsgrad,
                                     params)
        into = NO_INTO if _into is None else _into
        dests = [into.dests(where, lambda s: s.mu, grads),
                 into.dests(where, lambda s: s.nu, grads),
                 into.dests(where, lambda s: s.nu_max, grads, amsgrad)]
        lr = _schedules.learning_rate_at(learning_rate, state.count, where)
        steps = _steps(where, state, g_leaves)
        step = steps.to(torch.float64)  # each parameter's own count, as torch.optim's
        bias_correction1 = 1 - b1**step
        bias_correction2_sqrt = (1 - b2**step) ** 0.5
        step_size = lr / bias_correction1
        out: list[list[torch.Tensor | None]] = [[], [], [], []]
        for i, (g, p, m, v, v_max) in enumerate(zip(g_leaves, p_leaves, mu, nu, nu_max,
                                                    strict=True)):
            if g is None:  # no gradient: skipped, as torch.optim skips a .grad of None
                out[0].append(None)
                out[1].append(m)
                out[2].append(v)
                if amsgrad:
                    out[3].append(v_max)
                continue
            if wd != 0 and not decoupled:
                g = torch.add(g, p, alpha=wd, out=into.over(i, g))
            dm, dv, dmax = dests[0][i], dests[1][i], dests[2][i]
            m = torch.lerp(m, g, 1 - b1, out=dm)
            v = torch.addcmul(torch.mul(v, b2, out=dv), g, g, value=1 - b2, out=dv)
            if amsgrad:
                v_max = torch.maximum(v_max, v, out=dmax)
                out[3].append(v_max)
            t = into.tmp(i, g)
            denom = torch.sqrt(v_max if amsgrad else v, out=t)
            denom = torch.add(torch.div(denom, bias_correction2_sqrt[i], out=t), eps, out=t)
            u = torch.mul(-step_size[i], m, out=into.over(i, g))
            u = torch.div(u, denom, out=into.output(i, u))
            if wd != 0 and decoupled:
                u = torch.sub(u, torch.mul(p, lr * wd, out=t), out=into.output(i, u))
            out[0].append(u)
            out[1].append(m)
            out[2].append(v)
        new = [_base.unflatten_like(leaves, grads) for leaves in out[:3]]
        new_max = _base.unflatten_like(out[3], grads) if amsgrad else EmptyState()
        count = torch.add(state.count, 1, out=into.dest(lambda s: s.count))
        return new[0], AdamState(count, new[1], new[2], new_max,
                                 steps if state.steps is not None else None)

    return GradientTransformation(init, native(update))


def _steps(where: str, state: AdamState, grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Each parameter's step count after this update: one more where it has a gradient."""
    if state.steps is None:
        return (state.count + 1).expand(len(grads))
    if not isinstance(state.steps, torch.Tensor) or state.steps.shape != (len(grads),):
        got = (tuple(state.steps.shape) if isinstance(state.steps, torch.Tensor)
               else type(state.steps).__name__)
        raise ValueError(f"{where}: state.steps has shape {got}, but the grads have "
                         f"{len(grads)} leaves; initialize the state with the same optimizer "
                         f"and params")
    if all(g is not None for g in grads):
        return state.steps + 1
    took = torch.tensor([g is not None for g in grads], dtype=torch.int64,
                        device=state.steps.device)
    return state.steps + took


def adam(
    learning_rate: float | _schedules.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
) -> GradientTransformation:
    """Adam with the semantics of ``torch.optim.Adam`` (``betas=(b1, b2)``).

    Weight decay is an L2 penalty added to the gradient (``g += weight_decay * p``); for
    decoupled decay use :func:`adamw`. With ``amsgrad``, the running maximum of the raw second
    moment normalizes the step, as in torch.

    Args:
        learning_rate: a float >= 0 or a schedule of the step count.
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty >= 0 (``update`` then needs ``params``).
        amsgrad: use the AMSGrad variant.

    Example:
        >>> opt = fdp.optim.adam(0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([2.0, -3.0])}, opt.init(params))
        >>> updates["w"]  # the first Adam step is -lr * sign(g)
        tensor([-0.1000,  0.1000])
    """
    return _adam("adam", learning_rate, b1, b2, eps, weight_decay, amsgrad, decoupled=False)


def adamw(
    learning_rate: float | _schedules.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
) -> GradientTransformation:
    """AdamW with the semantics of ``torch.optim.AdamW``: decay decoupled from the gradient.

    The update is the Adam step minus ``lr * weight_decay * p`` (the params are shrunk by
    ``1 - lr * weight_decay``, with the scheduled lr), so ``update`` needs ``params`` unless
    ``weight_decay == 0``. Arguments as in :func:`adam`.

    Example:
        >>> opt = fdp.optim.adamw(0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([2.0])}
        >>> updates, _ = opt.update({"w": torch.tensor([1.0])}, opt.init(params), params)
        >>> updates["w"]  # -0.1 (Adam) - 0.1 * 0.5 * 2.0 (decay)
        tensor([-0.2000])
    """
    return _adam("adamw", learning_rate, b1, b2, eps, weight_decay, amsgrad, decoupled=True)
