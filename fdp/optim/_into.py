"""Destinations for the optimizers' results: how one update runs functionally or in place.

Every :mod:`fdp.optim` update writes its math once, as a sequence of torch ops that each take an
``out=`` destination. The destination comes from an :class:`Into` (or is ``None``: a fresh
tensor, the functional update), so the in-place and the functional update run the very same
kernels on the same values and agree bitwise by construction.

An :class:`Into` is made only by a training step that owns the memory it names
(``fdp.data_parallel_step(..., donate=...)``, see ``fdp/_state_pool.py``):

* ``state``: a tree shaped like the transformation's state whose tensor leaves are where the
  new state goes (the old state itself with ``donate="state"``, recycled buffers with
  ``donate="auto"``); ``None`` leaves (or ``state=None``) mean fresh tensors;
* ``scratch``: temporaries of parameter size that the step keeps between calls and never hands
  out (``None``: fresh temporaries);
* ``private_output``: whether the update's output may be written into scratch. It may not when
  a transformation without in-place support (a user's own) receives it: that one could keep
  it.

A transformation supports destinations when its update was registered with
``fdp.optim._native.native``;
:func:`fdp.optim.chain` passes an :class:`Into` only to those and runs the others functionally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fdp.optim import _base

__all__ = ["BIG", "Into", "Scratch"]


BIG = 1 << 15
"""Elements from which a leaf gets scratch (and, with ``donate="auto"``, recycled storage):
128 KiB of float32, glibc's default threshold for giving freed memory back to the kernel.
Smaller tensors come from malloc's arenas without page faults, and for them the bookkeeping
would cost more than the allocation."""


class Scratch:
    """Temporaries of parameter size, kept by one step between calls: slot ``k`` of leaf ``i``.

    Never handed out of the step; a tensor here is overwritten by the next update. Leaves
    under :data:`BIG` elements get none (``None``: a fresh temporary).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[int, int], torch.Tensor] = {}
        self._ids: set[int] = set()

    def owns(self, x: torch.Tensor) -> bool:
        return id(x) in self._ids

    def get(self, i: int, slot: int, like: torch.Tensor) -> torch.Tensor | None:
        if like.numel() < BIG:
            return None
        t = self._slots.get((i, slot))
        if (t is None or t.shape != like.shape or t.dtype != like.dtype
                or t.device != like.device):
            if t is not None:
                self._ids.discard(id(t))
            t = torch.empty_like(like, memory_format=torch.contiguous_format)
            self._slots[(i, slot)] = t
            self._ids.add(id(t))
        return t


class Into:
    """Where one transformation's update writes (see the module docstring)."""

    def __init__(self, state: Any, scratch: Scratch | None, private_output: bool) -> None:
        self.state = state
        self.scratch = scratch
        self.private_output = private_output

    def dests(self, where: str, part: Callable[[Any], Any], grads: Any,
              present: bool = True) -> list[torch.Tensor | None]:
        """The destinations of one part of the state (e.g. ``lambda s: s.mu``), aligned to
        the grads' leaves like :func:`fdp.optim._base.state_leaves`."""
        if self.state is None or not present:
            return [None] * len(_base.grad_leaves(grads, where))
        return _base.state_leaves(where, part(self.state), "destination", grads)

    def dest(self, part: Callable[[Any], Any]) -> torch.Tensor | None:
        """The destination of a tensor field of the state (e.g. the step count)."""
        if self.state is None:
            return None
        d = part(self.state)
        return d if isinstance(d, torch.Tensor) else None

    def tmp(self, i: int, g: torch.Tensor, slot: int = 1) -> torch.Tensor | None:
        """A destination for a temporary of leaf ``i`` (shaped like ``g``)."""
        return None if self.scratch is None else self.scratch.get(i, slot, g)

    def over(self, i: int, g: torch.Tensor) -> torch.Tensor | None:
        """A destination for a new value computed from ``g`` that replaces it within this
        update: ``g`` itself when the step owns it, else scratch slot 0 of leaf ``i``."""
        if self.scratch is None:
            return None
        return g if self.scratch.owns(g) else self.scratch.get(i, 0, g)

    def output(self, i: int, g: torch.Tensor) -> torch.Tensor | None:
        """The destination of the update's output for leaf ``i`` (``g``: a value the update
        no longer needs): as :meth:`over` when the output stays inside the step."""
        return self.over(i, g) if self.private_output else None

    def child(self, state: Any, private_output: bool) -> Into:
        return Into(state, self.scratch, private_output)



NO_INTO = Into(None, None, False)
"""The functional update: every destination is ``None`` (fresh tensors)."""
