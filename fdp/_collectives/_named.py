"""Named-axis collectives over one axis name or a tuple of them: reductions, gathers, indices.

The leaf operations are the autograd functions of :mod:`fdp._collectives._rules`; this module
validates the names, walks pytrees, and composes nested axes (a tuple of names) and groups
(``axis_index_groups``) out of the one-axis operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fdp import _check
from fdp._check import is_int
from fdp._collectives._compiled import compiled_all_reduce
from fdp._collectives._rules import (
    AllGather,
    AllReduce,
    comm_all_gather,
    comm_all_reduce,
    guard_compile,
    guard_forward_ad,
    tree_collective,
)
from fdp._compat import compiling
from fdp.backends._frame import AxisFrame, lookup
from fdp.backends._options import ReduceOp

__all__ = ["AxisName", "all_gather", "axis_index", "axis_size", "pmax", "pmean", "pmin", "psum"]

AxisName = str | tuple[str, ...]
"""One mesh axis, or several (nested pmaps) taken together as one, in the order given."""

Groups = Sequence[Sequence[int]] | None


def axis_names(axis_name: object, fn: str) -> tuple[str, ...]:
    """``axis_name`` as a tuple of names (a str is one name); a clear error when malformed."""
    if not isinstance(axis_name, tuple):
        if not isinstance(axis_name, str):
            raise TypeError(f"{fn}: axis_name must be a str or a tuple of str, got "
                            f"{type(axis_name).__name__}")
        return (axis_name,)
    if not axis_name:
        raise ValueError(f"{fn}: axis_name=() names no axis; pass a name or a tuple of names")
    for i, name in enumerate(axis_name):
        if not isinstance(name, str):
            raise TypeError(f"{fn}: axis_name[{i}] must be a str, got {type(name).__name__}")
    if len(set(axis_name)) < len(axis_name):
        raise ValueError(f"{fn}: axis_name={axis_name!r} names an axis more than once")
    return axis_name


def _all_reduce(tree: Any, axis_name: AxisName, op: ReduceOp, fn: str,
                groups: Groups = None) -> Any:
    names = axis_names(axis_name, fn)
    if groups is not None:
        return _grouped_reduce(tree, names, op, fn, groups)
    if len(names) > 1:  # nested axes have equal sizes, so a mean of means is the mean
        for name in reversed(names):
            tree = _all_reduce(tree, name, op, fn)
        return tree
    frame = lookup(names[0], fn)
    if frame.depth is None:  # frames of the fused step have a compile-safe form
        guard_compile(fn)
    guard_forward_ad(fn, frame.comm)

    def leaf_op(x: torch.Tensor) -> torch.Tensor:
        if op == "mean" and not (x.is_floating_point() or x.is_complex()):
            x = x.to(torch.get_default_dtype())  # as JAX: the mean of integers is a float
        if x.dtype == torch.bool:  # as torch.sum: a count; max/min stay bool
            return (_reduce_leaf(x.to(torch.int64), frame, op) if op == "sum"
                    else _reduce_leaf(x.to(torch.uint8), frame, op).bool())
        return _reduce_leaf(x, frame, op)

    return tree_collective(tree, fn, leaf_op)


def _reduce_leaf(x: torch.Tensor, frame: AxisFrame, op: ReduceOp) -> torch.Tensor:
    if frame.comm is not None:
        return comm_all_reduce(x.to(frame.index.device), frame.comm, op, frame.tape)
    if frame.depth is not None and compiling():
        return compiled_all_reduce(x, frame.index, op, frame.size, frame.depth, f"p{op}")
    return AllReduce.apply(x, frame.index, op, frame.size)


def _grouped_reduce(tree: Any, names: tuple[str, ...], op: ReduceOp, fn: str,
                    groups: Groups) -> Any:
    """A reduction within each group of replicas: everyone's value is gathered, and each
    replica reduces its own group's entries (JAX's ``axis_index_groups``)."""
    members = _group_table(groups, axis_size(names), fn)

    def leaf_op(x: torch.Tensor) -> torch.Tensor:
        if op == "mean" and not (x.is_floating_point() or x.is_complex()):
            x = x.to(torch.get_default_dtype())
        mine = members.to(x.device).index_select(0, axis_index(names).reshape(1)).reshape(-1)
        values = all_gather(x, names).index_select(0, mine)
        if op in ("sum", "mean"):
            dtype = torch.int64 if x.dtype == torch.bool else x.dtype
            out = values.sum(0, dtype=dtype)
            return out / len(mine) if op == "mean" else out
        return values.amax(0) if op == "max" else values.amin(0)

    return tree_collective(tree, fn, leaf_op)


def _group_table(groups: Any, n: int, fn: str) -> torch.Tensor:
    """``[n, k]``: row ``i`` lists the members of replica ``i``'s group."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise TypeError(f"{fn}: axis_index_groups must be a list of groups (lists of replica "
                        f"indices), e.g. [[0, 1], [2, 3]]; got {groups!r}")
    rows = [list(g) if isinstance(g, Sequence) and not isinstance(g, str) else None
            for g in groups]
    flat = [i for r in rows if r is not None for i in r]
    sizes = {len(r) for r in rows if r is not None}
    if None in rows or not all(is_int(i) for i in flat) or sorted(flat) != list(range(n)) \
            or len(sizes) != 1:
        raise ValueError(f"{fn}: axis_index_groups={groups!r} must split the {n} replicas into "
                         f"groups of equal size, each replica index 0..{n - 1} exactly once")
    table = [[0] * len(rows[0] or []) for _ in range(n)]
    for row in rows:
        assert row is not None
        for i in row:
            table[i] = row
    return torch.tensor(table, dtype=torch.int64)


def psum(x: Any, axis_name: AxisName, *, axis_index_groups: Groups = None) -> Any:
    """Sums a value (a pytree) over the replicas of ``axis_name``; every replica gets the sum.

    Differentiable: its transpose is ``psum`` of the cotangents. ``axis_name`` may be a tuple
    of names (nested pmaps): the sum over all of them. Integer values keep their dtype (as
    JAX); bools are counted (int64, as ``torch.sum``). ``axis_index_groups`` (e.g.
    ``[[0, 1], [2, 3]]``) sums within each group only.

    Example:
        >>> mesh = fdp.Mesh(4)
        >>> fdp.pmap(lambda x: fdp.psum(x, "dp"), mesh)(torch.arange(4.0))
        tensor([6., 6., 6., 6.])
    """
    return _all_reduce(x, axis_name, "sum", "psum", axis_index_groups)


def pmean(x: Any, axis_name: AxisName, *, axis_index_groups: Groups = None) -> Any:
    """Mean of a value over the replicas of ``axis_name`` (see :func:`psum`). The mean of
    integers or bools is a float (torch's default dtype), as in JAX."""
    return _all_reduce(x, axis_name, "mean", "pmean", axis_index_groups)


def pmax(x: Any, axis_name: AxisName, *, axis_index_groups: Groups = None) -> Any:
    """Maximum over the replicas; the gradient is shared equally among tied replicas."""
    return _all_reduce(x, axis_name, "max", "pmax", axis_index_groups)


def pmin(x: Any, axis_name: AxisName, *, axis_index_groups: Groups = None) -> Any:
    """Minimum over the replicas; the gradient is shared equally among tied replicas."""
    return _all_reduce(x, axis_name, "min", "pmin", axis_index_groups)


def all_gather(x: Any, axis_name: AxisName, axis: int = 0, tiled: bool = False, *,
               axis_index_groups: Groups = None) -> Any:
    """Gathers every replica's value: a new axis ``axis`` of size N (or concatenated if tiled).

    Over a tuple of axis names the new axis runs over all of them, in the order of
    :func:`axis_index` of that tuple. With ``axis_index_groups`` each replica gathers its
    group's values, in the group's order.

    Example:
        >>> mesh = fdp.Mesh(3)
        >>> fdp.pmap(lambda x: fdp.all_gather(x, "dp"), mesh, out_axes=None)(torch.arange(3.0))
        tensor([0., 1., 2.])
    """
    names = axis_names(axis_name, "all_gather")
    _check.integer(axis, "all_gather", "axis")
    members = None if axis_index_groups is None else _group_table(
        axis_index_groups, axis_size(names), "all_gather")

    def leaf_op(v: torch.Tensor) -> torch.Tensor:
        rank = v.dim() if tiled else v.dim() + 1  # tiled concatenates along an existing axis
        if not -rank <= axis < rank:
            raise ValueError(
                f"all_gather: axis={axis} is out of range for a value with {v.dim()} dims"
                f"{' and tiled=True' if tiled else ''}"
            )
        ax = axis % rank
        out = _gather_leaf(v, names, ax)
        if members is not None:
            mine = members.to(v.device).index_select(0, axis_index(names).reshape(1))
            out = out.index_select(ax, mine.reshape(-1))
        return out.flatten(ax, ax + 1) if tiled else out

    return tree_collective(x, "all_gather", leaf_op)


def _gather_leaf(v: torch.Tensor, names: tuple[str, ...], ax: int) -> torch.Tensor:
    """Untiled gather over ``names`` at ``ax``: the last name varies fastest."""
    for k, name in enumerate(reversed(names)):
        frame = lookup(name, "all_gather")
        guard_compile("all_gather")
        guard_forward_ad("all_gather", frame.comm)
        if frame.comm is not None:
            v = comm_all_gather(v.to(frame.index.device), frame.comm, ax, frame.tape)
        else:
            v = AllGather.apply(v, frame.index, ax, frame.size)
        if k:  # [this axis, the inner ones (flattened)] -> one axis
            v = v.flatten(ax, ax + 1)
    return v


def axis_index(axis_name: AxisName) -> torch.Tensor:
    """This replica's index along ``axis_name`` (an int64 scalar tensor); over a tuple of
    names, the row-major index over them (``("i", "j")``: ``i * size_j + j``), as in JAX."""
    names = axis_names(axis_name, "axis_index")
    index = lookup(names[0], "axis_index").index
    for name in names[1:]:
        frame = lookup(name, "axis_index")
        index = index * frame.size + frame.index.to(index.device)
    return index


def row_mask(axis_name: str) -> torch.Tensor | None:
    """This replica's real-row mask (bool, one entry per padded row) or ``None`` if unpadded."""
    return lookup(axis_name, "row_mask").mask


def row_offset(axis_name: str) -> torch.Tensor | None:
    """Index of this replica's first row in the full batch, or ``None`` if not split by fdp."""
    return lookup(axis_name, "row_offset").offset


def axis_size(axis_name: AxisName) -> int:
    """The number of replicas along ``axis_name`` (over a tuple of names, their product)."""
    size = 1
    for name in axis_names(axis_name, "axis_size"):
        size *= lookup(name, "axis_size").size
    return size
