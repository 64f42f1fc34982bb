"""Donated tensors: the record of inputs a ``donate="state"`` step consumed, and its checks.

A step built with ``fdp.data_parallel_step(..., donate="state")`` writes the new params and
optimizer state into the storage of the state it was given (JAX's ``donate_argnums``). The new
state holds new tensor objects that alias that storage; the old tensor objects are recorded
here, and fdp's entry points (the step, :func:`fdp.value_and_grad`,
:func:`fdp.optim.apply_updates`, every :mod:`fdp.optim` update, :func:`fdp.save_checkpoint`)
refuse them with an error naming the key path. The record holds weak references only: a
donated tensor nobody keeps is forgotten at once, so the check is an empty-set test in the usual
loop ``state, metrics = step(state, batch)``.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Literal, get_args

import torch

from fdp import _check, _tree
from fdp._compat import compiling, pytree

__all__ = ["Donate", "check_donate", "check_not_donated", "hand_over", "is_donated"]

Donate = Literal["auto", "state", "none"]
"""How a step may reuse storage: see :func:`fdp.data_parallel_step`."""

# id -> weak reference (a WeakSet would compare tensors with ``==`` on a hash match)
_DONATED: dict[int, weakref.ref[torch.Tensor]] = {}


def _forget(ref: weakref.ref[torch.Tensor], *, key: int) -> None:
    if _DONATED.get(key) is ref:
        del _DONATED[key]


def _donated(x: Any) -> bool:
    ref = _DONATED.get(id(x))
    return ref is not None and ref() is x

_FIX = ("was donated to a step built with donate='state', which wrote the new state into its "
        "memory; use the state that step returned, or build the step with donate='auto' or "
        "donate='none' to keep old states")


def check_donate(donate: Any, fn: str) -> Donate:
    """``donate`` as a :data:`Donate`, or a clear error naming the argument."""
    if not isinstance(donate, str):
        raise TypeError(f"{fn}: donate must be one of {list(get_args(Donate))}, got "
                        f"{type(donate).__name__}")
    return _check.choice(donate, get_args(Donate), fn, "donate",
                         "; e.g. donate='auto' (the default)")


def is_donated(x: Any) -> bool:
    """Whether ``x`` is a tensor that a ``donate="state"`` step consumed."""
    return isinstance(x, torch.Tensor) and bool(_DONATED) and _donated(x)


def check_not_donated(tree: Any, fn: str, name: str) -> None:
    """Raises a ValueError naming the first leaf of ``tree`` that was donated.

    Costs one emptiness test while no donated tensor is alive (the usual training loop).
    """
    if compiling() or not _DONATED:  # traced code never reads the record
        return
    if isinstance(tree, torch.Tensor):
        if _donated(tree):
            raise ValueError(f"{fn}: {name} {_FIX}")
        return
    if not any(_donated(x) for x in pytree.tree_leaves(tree)):
        return
    for path, leaf in _tree.leaves_with_path(tree, name):
        if _donated(leaf):
            raise ValueError(f"{fn}: {path} {_FIX}")


def hand_over(old: Any, new: Any) -> Any:
    """``new`` with every tensor that is also a leaf of ``old`` replaced by a fresh alias
    (``detach()``: the same storage, a new object); every tensor leaf of ``old`` is then
    recorded as donated."""
    old_leaves = [x for x in pytree.tree_leaves(old) if isinstance(x, torch.Tensor)]
    ids = {id(x) for x in old_leaves}
    leaves, spec = pytree.tree_flatten(new)
    fresh = [x.detach() if isinstance(x, torch.Tensor) and id(x) in ids else x for x in leaves]
    for x in old_leaves:
        _DONATED[id(x)] = weakref.ref(x, functools.partial(_forget, key=id(x)))
    return pytree.tree_unflatten(fresh, spec)
