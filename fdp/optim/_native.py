"""Which update functions are fdp's own: those take ``_into=`` (see ``fdp/optim/_into.py``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from fdp._compat import pytree

__all__ = ["fully_native", "is_native", "native", "written_state"]

_NATIVE: weakref.WeakKeyDictionary[Callable[..., Any], tuple[bool, list[Any] | None]] = (
    weakref.WeakKeyDictionary())


def native(update: Callable[..., Any], parts: list[Any] | None = None) -> Callable[..., Any]:
    """Marks ``update`` as one of fdp's own: it takes ``_into=`` (an ``Into``). ``parts``:
    the updates of a chain's transformations, in order (their states are the chain's)."""
    complete = parts is None or all(fully_native(u) for u in parts)
    _NATIVE[update] = (complete, parts)
    return update


def is_native(update: Any) -> bool:
    """Whether ``update`` takes ``_into=`` (see :func:`native`)."""
    try:
        return update in _NATIVE
    except TypeError:  # not weak-referenceable: not one of fdp's
        return False


def fully_native(update: Any) -> bool:
    """Whether ``update`` and every transformation inside it take ``_into=``."""
    return is_native(update) and _NATIVE[update][0]


def written_state(update: Any, state: Any) -> list[torch.Tensor]:
    """The tensors of ``state`` that ``update`` with ``_into=`` may write: all of a native
    transformation's state, none of a user's transformation's (inside a chain)."""
    if not is_native(update):
        return []
    parts = _NATIVE[update][1]
    if parts is None:
        return [x for x in pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]
    return [x for u, s in zip(parts, state, strict=True) for x in written_state(u, s)]
