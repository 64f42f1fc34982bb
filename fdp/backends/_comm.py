"""The communicator: how the replicas of one mesh axis exchange tensors.

The vmap backend needs none (its collectives are vmap rules over one tensor). The threads and
distributed backends put a :class:`Communicator` into every :class:`~fdp.backends.AxisFrame`
they bind; the collectives in :mod:`fdp._collectives` call it from inside the replica's own
thread or process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NoReturn

import torch

from fdp.backends._options import ReduceOp


class Communicator(ABC):
    """Moves tensors between the replicas of one mesh axis.

    Every replica calls the same methods in the same order with tensors of the same shape and
    dtype (checked: a mismatch raises ``ValueError`` naming the replicas and shapes, never
    returns garbage). Results are new tensors on the calling replica's device; inputs are
    never modified. A replica that fails or stops answering makes the others raise within the
    communicator's timeout instead of waiting forever.
    """

    size: int
    forward_ad: bool = True
    """Whether replicas may communicate inside forward-mode AD (``torch.func.jvp``): not
    where they share one process's forward-AD state (threads)."""

    @abstractmethod
    def index(self) -> int:
        """The calling replica's index in ``0..size-1``."""

    @abstractmethod
    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """``op`` over every replica's ``x``; all replicas get it."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every replica's ``x`` stacked on a new leading axis, in replica order."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Replica ``src``'s ``x`` on every replica."""

    def all_reduce_many(self, xs: list[torch.Tensor], op: ReduceOp) -> list[torch.Tensor]:
        """:meth:`all_reduce` of several tensors; backends coalesce them into flat buckets."""
        return [self.all_reduce(x, op) for x in xs]

    def all_gather_many(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`all_gather` of several tensors, one flat exchange per dtype."""
        out: list[torch.Tensor | None] = [None] * len(xs)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(xs):
            by_dtype.setdefault(x.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = self.all_gather(torch.cat([xs[i].reshape(-1) for i in idx]))
            parts = flat.split([xs[i].numel() for i in idx], dim=1)
            for i, part in zip(idx, parts, strict=True):
                out[i] = part.reshape(self.size, *xs[i].shape)
        return [x for x in out if x is not None]

    def tracked_all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """:meth:`all_reduce` computed from every replica's *tracked* ``x``, so that one
        autograd graph spans the replicas (backends with ``tape_collectives`` only)."""
        raise NotImplementedError(f"{type(self).__name__} has no tape collectives")

    def tracked_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`all_gather` on the shared tape (see :meth:`tracked_all_reduce`)."""
        raise NotImplementedError(f"{type(self).__name__} has no tape collectives")

    def pinned(self) -> Communicator:
        """This communicator bound to the calling replica, usable from any thread (autograd
        may run a collective's backward in one of its own threads)."""
        return self


class Unreachable(Communicator):
    """The communicator of replicas that cannot reach the rest of their axis (separate vmapped
    groups, ranks without a common process group): every collective raises ``ValueError``
    with ``message`` at once, on every replica that calls it, instead of reducing over part of
    the axis or waiting forever. ``message`` may be a function that builds it (formatting a
    batch size that torch.compile traces symbolically would specialize the compiled code on
    it)."""

    def __init__(self, size: int, message: str | Callable[[], str]) -> None:
        self.size, self.message = size, message

    def _fail(self) -> NoReturn:
        raise ValueError(self.message if isinstance(self.message, str) else self.message())

    def index(self) -> int:
        self._fail()

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        self._fail()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self._fail()

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._fail()

    def all_reduce_many(self, xs: list[torch.Tensor], op: ReduceOp) -> list[torch.Tensor]:
        self._fail()

    def all_gather_many(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        self._fail()

    def tracked_all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        self._fail()

    def tracked_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self._fail()
