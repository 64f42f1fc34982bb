"""The interface between fdp's public functions and the machinery that runs replicas."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fdp._layout import Layout

ReduceOp = str  # "sum" | "mean" | "max" | "min"


class Backend(ABC):
    """How replicas are placed and how the primitives move data between them.

    A *replicated value* is the backend's representation of one tensor per replica (for the vmap
    backend: a tensor with a leading replica axis). Each method works on one tensor leaf; the
    public functions do tree traversal and argument checking.
    """

    name: str
    size: int

    @property
    def local_size(self) -> int:
        """Replicas whose values this process holds (the leading axis of replicated values)."""
        return self.size

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor with one entry per replica on its leading axis."""
        return x

    tape_collectives = False  # see fdp._collectives._on_shared_tape

    def comm(self) -> Any:
        """The communicator collectives use inside :meth:`map` (``None``: vmap rules)."""
        return None

    @abstractmethod
    def replicate(self, x: torch.Tensor) -> torch.Tensor:
        """One copy of ``x`` per replica."""

    @abstractmethod
    def unreplicate(self, x: torch.Tensor) -> torch.Tensor:
        """Replica 0's value."""

    @abstractmethod
    def shard(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Rows of ``x`` along ``layout.dim`` split per replica (padded to ``layout.max_size``)."""

    @abstractmethod
    def unshard(self, x: torch.Tensor, layout: Layout, dim: int) -> torch.Tensor:
        """Inverse of :meth:`shard` along per-replica dim ``dim``: real rows, original order."""

    @abstractmethod
    def all_reduce(
        self, x: torch.Tensor, op: ReduceOp, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """Reduces over replicas; every replica receives the result."""

    @abstractmethod
    def map(
        self,
        body: Callable[..., Sequence[torch.Tensor]],
        mapped: Sequence[torch.Tensor],
        in_dims: Sequence[int],
        randomness: str = "error",
    ) -> list[torch.Tensor]:
        """Runs ``body(index, *per_replica_tensors)`` on every replica.

        ``index`` is the replica's index; the collectives use it to find this mapping. Outputs
        come back as replicated values with the replica axis first. ``randomness`` is
        ``"error"``, ``"different"`` or ``"same"`` (``torch.func.vmap``'s modes).
        """

    @abstractmethod
    def value_and_grad(self, plan: Any, params: dict, batch: Any) -> tuple[Any, dict]:
        """Loss and gradient of ``plan`` (see ``fdp._grad.GradPlan``) for the full batch."""
