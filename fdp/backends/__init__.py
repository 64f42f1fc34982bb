"""Backends that run the replicas of a :class:`fdp.Mesh`.

Every backend implements :class:`Backend`; the public functions of fdp only call that interface,
so a program runs unchanged on any backend.
"""

from fdp.backends._base import Backend
from fdp.backends.distributed import DistributedBackend
from fdp.backends.threads import ThreadsBackend
from fdp.backends.vmap import VmapBackend

__all__ = ["Backend", "DistributedBackend", "ThreadsBackend", "VmapBackend"]
