"""The backend contract: what a backend implements, and everything it receives.

fdp's public functions validate their arguments and then call a :class:`Backend` through
``mesh.backend``; they never ask which backend it is. What differs between backends is either
a method here or a capability attribute (``ragged``, ``tape_collectives``,
``replicas_share_generator``). The types a backend receives live beside this module and are
re-exported from it, so this file is the whole contract:

* :class:`GradPlan` (``_plan.py``): one data-parallel loss and gradient, for
  :meth:`Backend.value_and_grad`; :class:`SplitLoss` for the ``"gather"`` strategy;
* :class:`ModuleCall` (``_module.py``): one forward of :class:`fdp.DataParallel`, for
  :meth:`Backend.run_module`;
* :class:`AxisFrame` and :func:`bind_axis` (``_frame.py``): the axis a replica runs in, which
  the collectives look up by name;
* :class:`Communicator` (``_comm.py``): how replicas exchange tensors (threads, processes);
* the string options as ``Literal`` types with their validators (``_options.py``);
* :class:`fdp.Layout` (``fdp/_layout.py``): how a batch's rows are split over replicas.

The implementations: ``vmap.py`` (N virtual replicas on one device), ``threads.py`` (one
replica per device, each in a thread), ``distributed.py`` (one replica per process); the
latter two share ``_spmd.py``, and the first two share the stacked placement of
``_stacked.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fdp._layout import Layout
from fdp.backends._comm import Communicator, Unreachable
from fdp.backends._frame import AxisFrame, bind_axis, bound_frames, lookup
from fdp.backends._module import ModuleCall, ModuleResult
from fdp.backends._options import (
    BUFFER_POLICIES,
    RANDOMNESS,
    REDUCE_OPS,
    REDUCTIONS,
    SPLIT_NAMES,
    STRATEGIES,
    BufferPolicy,
    Executor,
    Randomness,
    ReduceOp,
    Reduction,
    SplitName,
    SplitRule,
    Strategy,
    check_buffer_policy,
    check_randomness,
    check_reduce_op,
    check_reduction,
    check_strategy,
)
from fdp.backends._plan import GradPlan, KeyScope, Params, PyTree, SplitLoss

__all__ = [
    "BUFFER_POLICIES",
    "RANDOMNESS",
    "REDUCE_OPS",
    "REDUCTIONS",
    "SPLIT_NAMES",
    "STRATEGIES",
    "AxisFrame",
    "Backend",
    "BufferPolicy",
    "Communicator",
    "Executor",
    "GradPlan",
    "KeyScope",
    "Layout",
    "MapBody",
    "ModuleCall",
    "ModuleResult",
    "Params",
    "PyTree",
    "Randomness",
    "ReduceOp",
    "Reduction",
    "Replica",
    "SplitLoss",
    "SplitName",
    "SplitRule",
    "Strategy",
    "Unreachable",
    "bind_axis",
    "bound_frames",
    "check_buffer_policy",
    "check_randomness",
    "check_reduce_op",
    "check_reduction",
    "check_strategy",
    "lookup",
]

@dataclass(frozen=True)
class Replica:
    """What one replica of a :meth:`fdp.backends.Backend.map` is told about itself;
    ``fdp.pmap`` makes its :class:`AxisFrame` from it.

    Attributes:
        index: the replica's index (an int64 scalar tensor; on the vmap backend, batched at the
            map's vmap level).
        comm: how it exchanges values with the others (``None``: vmap rules).
        tape: its collectives build one autograd graph across the replicas
            (:attr:`fdp.backends.Backend.tape_collectives`).
    """

    index: torch.Tensor
    comm: Communicator | None
    tape: bool


MapBody = Callable[..., Sequence[torch.Tensor]]
"""``body(replica, *per_replica_tensors) -> tensors``: one replica's part of a
:meth:`Backend.map` (``replica`` is a :class:`fdp.backends.Replica`)."""


class Backend(ABC):
    """Where a mesh's replicas live, and how values move between them.

    A *replicated value* is a tensor with a leading axis that holds one entry per replica this
    process holds (:attr:`local_size`: all of them on the vmap and threads backends, one on the
    distributed backend). The data methods each work on one tensor leaf; the public functions
    walk the trees and check the arguments first.

    A backend sets :attr:`size` and :attr:`devices` in its constructor and pickles as the call
    that rebuilds it (``__reduce__``), since a pickled :class:`fdp.Mesh` holds its backend; one
    that stands for something that cannot travel (a process group) raises there instead.
    Comparing a backend with a str (``mesh.backend == "vmap"``, ``in ("vmap", ...)``) raises
    ``TypeError``: ask for :attr:`fdp.Mesh.backend_name`, or better, a capability.

    Attributes:
        name: ``"vmap"``, ``"threads"`` or ``"distributed"``: for messages and reprs, never for
            dispatch (use the capabilities).
        size: the number of replicas.
        devices: the device of each replica.
        ragged: replicas can run different numbers of rows in one :meth:`map` (each replica
            is its own thread or process); on the vmap backend they cannot (one vmap).
        tape_collectives: collectives inside a :meth:`map` under tape autograd build one
            autograd graph across the replicas, so that ``.backward()`` after a pmap works
            (the threads backend's replicas run in one process).
        replicas_share_generator: the replicas draw from one torch generator concurrently, so
            ``randomness="same"`` cannot be honoured.
    """

    name: ClassVar[str]
    ragged: ClassVar[bool] = False
    tape_collectives: ClassVar[bool] = False
    replicas_share_generator: ClassVar[bool] = False

    size: int
    devices: tuple[torch.device, ...]

    # --- placement ------------------------------------------------------------------------

    @property
    def local_size(self) -> int:
        """Replicas whose values this process holds (the leading axis of replicated values)."""
        return self.size

    @property
    def home(self) -> torch.device:
        """The device this process keeps replicated values on."""
        return self.devices[0]

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's entries of a tensor with one entry per replica on its leading axis."""
        return x

    def comm(self) -> Communicator | None:
        """The communicator collectives use inside :meth:`map` (``None``: vmap rules)."""
        return None

    @property
    def process_index(self) -> int:
        """This process's index among the processes that hold the mesh (0 in one process)."""
        return 0

    def agree(self, ok: bool, fn: str) -> bool:
        """Whether ``ok`` holds in every process that holds the mesh: a collective that all
        of them call (e.g. after process 0 wrote a checkpoint); ``fn`` names it in errors."""
        return ok

    def placement(self) -> str:
        """Where the replicas are, as ``Mesh``'s repr shows it."""
        return f"devices={[str(d) for d in self.devices]!r}"

    # --- the primitives -------------------------------------------------------------------

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
    def all_reduce(self, x: torch.Tensor, op: ReduceOp,
                   weights: torch.Tensor | None) -> torch.Tensor:
        """Reduces over replicas; every replica receives the result. With ``weights`` (one
        per replica, ``op="mean"``) the weighted mean ``Σ wᵢxᵢ / Σ wᵢ``."""

    @abstractmethod
    def map(self, body: MapBody, mapped: Sequence[torch.Tensor], in_dims: Sequence[int],
            randomness: Randomness = "error") -> list[torch.Tensor]:
        """Runs ``body(replica, *per_replica_tensors)`` on every replica.

        ``mapped[i]`` holds the replicas along ``in_dims[i]``; ``replica`` is a
        :class:`fdp.backends.Replica` (the caller binds it into an :class:`AxisFrame`).
        Outputs come back as replicated values, the replica axis first.
        """

    @abstractmethod
    def value_and_grad(self, plan: GradPlan, params: Params,
                       batch: PyTree) -> tuple[Any, Params]:
        """The full batch's loss and gradient (see :class:`GradPlan`):
        ``(loss, grads)``, ``((loss, aux), grads)`` with ``has_aux``, and with a buffer policy
        ``((out, kept_buffers), grads)``."""

    def run_module(self, call: ModuleCall) -> ModuleResult | None:
        """Runs one :class:`fdp.DataParallel` forward itself, or returns ``None`` (the default)
        to let ``DataParallel`` compose it from ``replicate``, ``scatter``, ``pmap`` and
        ``gather``: a backend overrides this where that composition cannot express its
        autograd (the distributed backend sums the parameters' gradients over processes)."""
        return None

    def subgroup(self, size: int) -> Backend:
        """A backend of the same kind and options over ``size`` replicas on this one's home
        device: how a backend that is not :attr:`ragged` runs a group of equal shards apart."""
        raise NotImplementedError(f"the {self.name} backend runs ragged shards itself")

    # --- identity ---------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            raise TypeError(
                f"a Backend is not a str: compare mesh.backend_name == {other!r} (mesh.backend "
                f"is the {type(self).__name__} object)"
            )
        return self is other

    def __hash__(self) -> int:
        return id(self)
