"""RMSprop, optionally centered and with momentum."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fdp.optim import _base, _schedules
from fdp.optim._base import EmptyState, GradientTransformation, PyTree
from fdp.optim._into import NO_INTO, Into
from fdp.optim._native import native

__all__ = ["RMSPropState", "rmsprop"]


class RMSPropState(NamedTuple):
    """State of :func:`rmsprop`.

    Attributes:
        count: number of updates done, a 0-d int64 tensor.
        square_avg: running average of the squared gradients.
        grad_avg: running average of the gradients (``centered=True``).
        momentum_buffer: the momentum buffers (``momentum > 0``).

    A part the configuration does not use is an ``EmptyState()`` (a tree with no leaves).
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's field name shadows tuple.count
    square_avg: PyTree
    grad_avg: PyTree
    momentum_buffer: PyTree


def rmsprop(
    learning_rate: float | _schedules.Schedule,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """RMSprop with the semantics of ``torch.optim.RMSprop``.

    Per leaf: ``g += weight_decay * p``; ``square_avg = alpha * square_avg + (1 - alpha) * g**2``;
    the denominator is ``sqrt(square_avg) + eps`` (centered: ``sqrt(square_avg - grad_avg**2) +
    eps``); with momentum ``buf = momentum * buf + g / denom`` and the update ``-lr * buf``,
    else ``-lr * g / denom``.

    Args:
        learning_rate: a float >= 0 or a schedule of the step count.
        alpha: smoothing constant, in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty >= 0 (``update`` then needs ``params``).
        momentum: momentum factor >= 0.
        centered: normalize by the estimated variance of the gradient.

    Example:
        >>> opt = fdp.optim.rmsprop(0.01, alpha=0.75)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, _ = opt.update({"w": torch.tensor([3.0])}, opt.init(params))
        >>> updates["w"]  # -0.01 * 3 / sqrt(0.25 * 9)
        tensor([-0.0200])
    """
    fn = "rmsprop"
    _schedules.check_learning_rate(learning_rate, fn)
    a = _base.unit_interval(alpha, fn, "alpha")
    eps = _base.nonnegative(eps, fn, "eps")
    wd = _base.nonnegative(weight_decay, fn, "weight_decay")
    m = _base.nonnegative(momentum, fn, "momentum")
    if not isinstance(centered, bool):
        raise TypeError(f"{fn}: centered must be a bool, got {type(centered).__name__}")

    def init(params: PyTree) -> RMSPropState:
        leaves = _base.float_params(params, "rmsprop.init")

        def zeros() -> PyTree:
            return _base.unflatten_like([torch.zeros_like(p) for p in leaves], params)

        return RMSPropState(_base.step_count(leaves), zeros(),
                            zeros() if centered else EmptyState(),
                            zeros() if m > 0 else EmptyState())

    def update(
        grads: PyTree, state: RMSPropState, params: PyTree | None = None, *,
        _into: Into | None = None,
    ) -> tuple[PyTree, RMSPropState]:
        where = "rmsprop.update"
        g_leaves, p_leaves = _base.update_inputs(where, "rmsprop", state, RMSPropState, grads,
                                                 params, wd)
        sq = _base.state_leaves(where, state.square_avg, "state.square_avg", grads,
                                params=params)
        ga = _base.state_leaves(where, state.grad_avg, "state.grad_avg", grads, centered,
                                params)
        buf = _base.state_leaves(where, state.momentum_buffer, "state.momentum_buffer", grads,
                                 m > 0, params)
        into = NO_INTO if _into is None else _into
        dests = zip(into.dests(where, lambda s: s.square_avg, grads),
                    into.dests(where, lambda s: s.grad_avg, grads, centered),
                    into.dests(where, lambda s: s.momentum_buffer, grads, m > 0), strict=True)
        lr = _schedules.learning_rate_at(learning_rate, state.count, where)
        out: list[list[torch.Tensor | None]] = [[], [], [], []]
        for i, (g, p, s, c, b, (ds, dc, db)) in enumerate(zip(g_leaves, p_leaves, sq, ga, buf,
                                                                dests, strict=True)):
            if g is None:  # no gradient: skipped, as torch.optim skips a .grad of None
                out[0].append(None)
                out[1].append(s)
                if centered:
                    out[2].append(c)
                if m > 0:
                    out[3].append(b)
                continue
            if wd != 0:
                g = torch.add(g, p, alpha=wd, out=into.over(i, g))
            s = torch.addcmul(torch.mul(s, a, out=ds), g, g, value=1 - a, out=ds)
            out[1].append(s)
            t = into.tmp(i, g)
            if centered:
                c = torch.lerp(c, g, 1 - a, out=dc)
                out[2].append(c)
                avg = torch.sqrt(torch.addcmul(s, c, c, value=-1, out=t), out=t)
            else:
                avg = torch.sqrt(s, out=t)
            avg = torch.add(avg, eps, out=t)
            if m > 0:
                b = torch.addcdiv(torch.mul(b, m, out=db), g, avg, out=db)
                out[3].append(b)
                out[0].append(torch.mul(b, -lr, out=into.output(i, g)))
            else:
                u = torch.mul(g, -lr, out=into.output(i, g))
                out[0].append(torch.div(u, avg, out=into.output(i, u)))

        def tree(i: int, present: bool = True) -> PyTree:
            return _base.unflatten_like(out[i], grads) if present else EmptyState()

        count = torch.add(state.count, 1, out=into.dest(lambda s: s.count))
        new = RMSPropState(count, tree(1), tree(2, centered), tree(3, m > 0))
        return tree(0), new

    return GradientTransformation(init, native(update))
