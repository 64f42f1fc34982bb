"""The communicator interface of the backends that run replicas concurrently (threads, processes).

The vmap backend needs none: its collectives are vmap rules. The threads and distributed
backends hand a :class:`Communicator` to every axis frame they bind; the collectives in
``fdp._collectives`` call it from inside the replica's own thread or process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

OPS = ("sum", "mean", "max", "min")


class Communicator(ABC):
    """Moves tensors between the replicas of one mesh axis.

    Every replica calls the same methods in the same order with tensors of the same shape and
    dtype (checked: a mismatch raises ``ValueError`` naming the replicas and shapes, never
    returns garbage). Results are new tensors on the calling replica's device; inputs are
    never modified. A replica that fails or stops answering makes the others raise within the
    communicator's timeout instead of waiting forever.
    """

    size: int

    @abstractmethod
    def index(self) -> int:
        """The calling replica's index in ``0..size-1``."""

    @abstractmethod
    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``op`` (one of :data:`OPS`) over every replica's ``x``; all replicas get it."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every replica's ``x`` stacked on a new leading axis, in replica order."""

    def all_reduce_many(self, xs: list[torch.Tensor], op: str) -> list[torch.Tensor]:
        """:meth:`all_reduce` of several tensors; backends coalesce them into flat buckets."""
        return [self.all_reduce(x, op) for x in xs]

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Replica ``src``'s ``x`` on every replica."""

    def pinned(self) -> Communicator:
        """This communicator bound to the calling replica, usable from any thread (autograd
        may run a collective's backward in one of its own threads)."""
        return self


class Unreachable(Communicator):
    """The communicator of replicas that cannot reach the rest of their axis (separate vmapped
    groups, ranks without a common process group): every collective raises ``ValueError``
    with ``message`` at once, on every replica that calls it, instead of reducing over part of
    the axis or waiting forever."""

    def __init__(self, size: int, message: str) -> None:
        self.size, self.message = size, message

    def _fail(self, *_: object) -> torch.Tensor:
        raise ValueError(self.message)

    index = all_reduce = all_gather = broadcast = all_reduce_many = _fail  # type: ignore[assignment]
    tracked_all_reduce = tracked_all_gather = _fail

    def pinned(self) -> Communicator:
        return self
