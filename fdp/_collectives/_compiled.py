"""The vmap backend's reductions in a form torch.compile keeps (pytorch#129845).

torch.compile drops the custom ``vmap`` staticmethod of an ``autograd.Function``
(pytorch#129845): traced, :class:`fdp._collectives._rules.AllReduce` would become the
identity. A ``torch.library.custom_op`` with a registered vmap rule survives compilation where
the gradient is taken *outside* the vmap (``grad(vmap(loss))``: the vmap rule lowers the
reduction to plain, differentiable tensor ops before autograd sees it), which is exactly
``value_and_grad``'s fused step. Where a ``torch.func`` transform other than ``vmap`` sits
between the replica's frame and the collective (e.g. ``torch.func.grad`` inside ``loss_fn``),
the op's vmap rule would run under that transform, which compile does not get right: that case
raises (:func:`check_transforms`).

Only frames that the vmap backend's fused step binds while torch.compile traces it carry the
interpreter depth (:attr:`fdp.backends._frame.AxisFrame.depth`) that enables this path; eager
code keeps :class:`~fdp._collectives._rules.AllReduce`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fdp._collectives._rules import _extreme_backward, _reduce
from fdp._compat import functorch_kinds

__all__ = ["check_transforms", "compiled_all_reduce"]


def check_transforms(depth: int, fn: str) -> None:
    """Raises unless only ``vmap`` transforms lie between the frame (at ``depth``) and here."""
    above = functorch_kinds()[depth:]
    if any(kind != "Vmap" for kind in above):
        raise RuntimeError(
            f"fdp.{fn} inside {'/'.join(above)} transforms within value_and_grad's loss_fn "
            f"cannot be traced by torch.compile: the compiler drops custom vmap rules "
            f"(pytorch#129845) and would silently skip the collective. Keep such a loss_fn "
            f"eager, or take the gradient with fdp.value_and_grad only"
        )


@torch.library.custom_op("fdp::vmap_all_reduce", mutates_args=())
def _vmap_all_reduce(x: Tensor, index: Tensor, op: str, n: int) -> Tensor:
    # Reached only where nothing is batched (below every vmap level): the closed form.
    return _reduce(op, x, None, n)  # type: ignore[arg-type]


@_vmap_all_reduce.register_fake
def _(x: Tensor, index: Tensor, op: str, n: int) -> Tensor:
    return torch.empty_like(x)


def _vmap_rule(info: Any, in_dims: tuple[int | None, ...], x: Tensor, index: Tensor, op: str,
               n: int) -> tuple[Tensor, int | None]:
    x_dim, index_dim = in_dims[0], in_dims[1]
    if index_dim is None:  # a vmap level inside the replica: pass through, one level down
        return _vmap_all_reduce(x, index, op, n), x_dim
    return _reduce(op, x, x_dim, n), None  # type: ignore[arg-type]


_vmap_all_reduce.register_vmap(_vmap_rule)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, ctx.index, ctx.op, ctx.n = inputs
    if ctx.op in ("max", "min"):
        ctx.save_for_backward(x, output)


def _backward(ctx: Any, g: Tensor) -> tuple:
    if ctx.op in ("sum", "mean"):
        return _vmap_all_reduce(g, ctx.index, ctx.op, ctx.n), None, None, None
    x, y = ctx.saved_tensors
    total = _extreme_backward(g, x, y, lambda t: _vmap_all_reduce(t, ctx.index, "sum", ctx.n))
    return total, None, None, None


_vmap_all_reduce.register_autograd(_backward, setup_context=_setup_context)


def compiled_all_reduce(x: Tensor, index: Tensor, op: str, n: int, depth: int,
                        fn: str) -> Tensor:
    """``psum``/``pmean``/``pmax``/``pmin`` of ``x`` over the frame whose ``index`` is batched
    at its own vmap level, as torch.compile traces it."""
    check_transforms(depth, fn)
    return _vmap_all_reduce(x, index, op, n)
