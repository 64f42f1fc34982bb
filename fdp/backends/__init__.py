"""Backends that run the replicas of a :class:`fdp.Mesh`.

Every backend implements :class:`Backend` (``_base.py``: the contract, with every type a backend
receives); fdp's public functions only call that interface, so a program runs unchanged on any
backend. The implementations are imported on first use: they build on fdp's core modules,
which in turn import the contract from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fdp.backends._base import (
    AxisFrame,
    Backend,
    BufferPolicy,
    Communicator,
    Executor,
    GradPlan,
    ModuleCall,
    ModuleResult,
    Randomness,
    ReduceOp,
    Reduction,
    Replica,
    SplitLoss,
    SplitRule,
    Strategy,
)
from fdp.backends._fallback import FallbackWarning

if TYPE_CHECKING:
    from fdp.backends._dist_comm import PeerFailure, PeerTimeout
    from fdp.backends.distributed import DistributedBackend
    from fdp.backends.threads import ThreadsBackend
    from fdp.backends.vmap import VmapBackend

__all__ = [
    "AxisFrame",
    "Backend",
    "BufferPolicy",
    "Communicator",
    "DistributedBackend",
    "Executor",
    "FallbackWarning",
    "GradPlan",
    "ModuleCall",
    "ModuleResult",
    "PeerFailure",
    "PeerTimeout",
    "Randomness",
    "ReduceOp",
    "Reduction",
    "Replica",
    "SplitLoss",
    "SplitRule",
    "Strategy",
    "ThreadsBackend",
    "VmapBackend",
    "cpu_backends",
]

_IMPLEMENTATIONS = {
    "VmapBackend": "fdp.backends.vmap",
    "ThreadsBackend": "fdp.backends.threads",
    "DistributedBackend": "fdp.backends.distributed",
    "PeerFailure": "fdp.backends._dist_comm",
    "PeerTimeout": "fdp.backends._dist_comm",
}


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _IMPLEMENTATIONS:
        return getattr(importlib.import_module(_IMPLEMENTATIONS[name]), name)
    raise AttributeError(f"module 'fdp.backends' has no attribute {name!r}")


def cpu_backends() -> dict[str, Callable[[int], Backend]]:
    """The backends that run ``n`` replicas in this process on the CPU, by name:
    ``{"vmap": make(n), "threads": make(n)}`` (what :func:`fdp.testing.strategies.meshes`
    draws from)."""
    from fdp.backends.threads import ThreadsBackend
    from fdp.backends.vmap import VmapBackend

    cpu = torch.device("cpu")
    return {
        VmapBackend.name: lambda n: VmapBackend(n, cpu),
        ThreadsBackend.name: lambda n: ThreadsBackend((cpu,) * n, 300.0),
    }
