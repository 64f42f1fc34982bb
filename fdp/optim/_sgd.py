"""Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fdp._compat import compiling, is_functorch_wrapped
from fdp.optim import _base, _schedules
from fdp.optim._base import EmptyState, GradientTransformation, PyTree
from fdp.optim._into import NO_INTO, Into
from fdp.optim._native import native

__all__ = ["SGDState", "sgd"]


class SGDState(NamedTuple):
    """State of :func:`sgd`: the step count and the momentum buffers.

    Without momentum, ``momentum_buffer`` is an ``EmptyState()`` (a tree with no leaves).
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's field name shadows tuple.count
    momentum_buffer: PyTree


def sgd(
    learning_rate: float | _schedules.Schedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """SGD with the semantics of ``torch.optim.SGD``.

    Per leaf: ``g += weight_decay * p``; with momentum, ``buf = g`` on the first step and
    ``buf = momentum * buf + (1 - dampening) * g`` after; ``g = g + momentum * buf`` (Nesterov)
    or ``g = buf``; the update is ``-lr * g``.

    Args:
        learning_rate: a float >= 0 or a schedule of the step count.
        momentum: momentum factor >= 0.
        dampening: dampening of the momentum.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty >= 0 (``update`` then needs ``params``).

    Example:
        >>> opt = fdp.optim.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update({"w": torch.tensor([1.0])}, state, params)
        ...     params = fdp.optim.apply_updates(params, updates)
        >>> params["w"]
        tensor([0.7100])
    """
    fn = "sgd"
    _schedules.check_learning_rate(learning_rate, fn)
    m = _base.nonnegative(momentum, fn, "momentum")
    d = _base.number(dampening, fn, "dampening")
    wd = _base.nonnegative(weight_decay, fn, "weight_decay")
    if not isinstance(nesterov, bool):
        raise TypeError(f"{fn}: nesterov must be a bool, got {type(nesterov).__name__}")
    if nesterov and (m <= 0 or d != 0):
        raise ValueError(
            f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, got momentum={m}, "
            f"dampening={d}; e.g. sgd(lr, momentum=0.9, nesterov=True)"
        )

    def init(params: PyTree) -> SGDState:
        leaves = _base.float_params(params, "sgd.init")
        buf = (_base.unflatten_like([torch.zeros_like(p) for p in leaves], params)
               if m != 0 else EmptyState())
        return SGDState(_base.step_count(leaves), buf)

    def update(
        grads: PyTree, state: SGDState, params: PyTree | None = None, *,
        _into: Into | None = None,
    ) -> tuple[PyTree, SGDState]:
        where = "sgd.update"
        g_leaves, p_leaves = _base.update_inputs(where, "sgd", state, SGDState, grads, params,
                                                 wd)
        lr = _schedules.learning_rate_at(learning_rate, state.count, where)
        b_leaves = _base.state_leaves(where, state.momentum_buffer, "state.momentum_buffer",
                                      grads, m != 0, params)
        into = NO_INTO if _into is None else _into
        b_dests = into.dests(where, lambda s: s.momentum_buffer, grads, m != 0)
        first = state.count == 0
        later = _known_later(state.count)
        updates: list[torch.Tensor | None] = []
        buffers: list[torch.Tensor] = []
        for i, (g, p, b, bd) in enumerate(zip(g_leaves, p_leaves, b_leaves, b_dests,
                                              strict=True)):
            if g is None:  # no gradient: skipped, as torch.optim skips a .grad of None
                updates.append(None)
                if m != 0:
                    buffers.append(b)
                continue
            if wd != 0:
                g = torch.add(g, p, alpha=wd, out=into.over(i, g))
            if m != 0:
                b = torch.add(torch.mul(b, m, out=bd), g, alpha=1 - d, out=bd)
                if not later:  # where(False, g, b) is b, bitwise: skipped when known
                    b = torch.where(first, g, b, out=bd)
                buffers.append(b)
                g = torch.add(g, b, alpha=m, out=into.over(i, g)) if nesterov else b
            updates.append(torch.mul(g, -lr, out=into.output(i, g)))
        new_buf = _base.unflatten_like(buffers, grads) if m != 0 else EmptyState()
        count = torch.add(state.count, 1, out=into.dest(lambda s: s.count))
        return _base.unflatten_like(updates, grads), SGDState(count, new_buf)

    return GradientTransformation(init, native(update))


def _known_later(count: torch.Tensor) -> bool:
    """Whether ``count`` is known (on the host, without a device sync) to be past the first
    step; ``False`` under ``torch.compile`` or a ``torch.func`` transform."""
    if count.device.type != "cpu" or compiling() or is_functorch_wrapped(count):
        return False
    return bool(count != 0)
