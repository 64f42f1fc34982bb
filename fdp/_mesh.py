"""``fdp.Mesh``: where the replicas of one SPMD program live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fdp.backends._base import Backend
from fdp.backends._options import Executor
from fdp.backends.distributed import DistributedBackend
from fdp.backends.threads import ThreadsBackend
from fdp.backends.vmap import VmapBackend

__all__ = ["DEFAULT_AXIS_NAME", "Mesh", "check_mesh"]

DEFAULT_AXIS_NAME = "dp"


class Mesh:
    """A one-dimensional set of replicas and the backend that runs them.

    ``Mesh(n)`` puts ``n`` virtual replicas on one device (the *vmap* backend): a replica is a
    slice of a vmapped axis, and collectives reduce over that axis. Programs written against a
    mesh only use its public surface (``size``, ``axis_name``, ``devices``) and the fdp
    primitives, so the same program runs on the backends that place one replica per device
    or per process.

    Args:
        n: number of replicas (an int ≥ 1).
        axis_name: the name collectives use to address this axis inside :func:`fdp.pmap`.
        device: the device of the vmap backend (default: CPU).
        devices: one replica per listed device, each run by its own thread (the *threads*
            backend), e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu"] * 3``.
        executor: how ``Mesh(n)`` runs its virtual replicas: ``"auto"`` (default: one
            ``torch.func.vmap``, the fast path; where vmap cannot run the function, e.g. an
            ``nn.LSTM``, ``.item()``, data-dependent control flow or autocast, the general
            executor, with a one-time :class:`fdp.FallbackWarning`), ``"vmap"`` (vmap only:
            its errors raise), ``"general"`` (always one thread per replica on ``device``:
            exact for any function that runs on one device, without vmap's batching) or
            ``"replay"`` (``"auto"``, with :func:`fdp.value_and_grad`'s step traced once per
            input signature and replayed: bitwise the same results without vmap's per-op
            cost, for losses that read no Python state outside their arguments; see
            docs/backends.md).
        timeout: seconds a replica thread may take (and wait in a collective) before the
            step fails with ``TimeoutError`` instead of hanging (threads backend, and the
            general executor of ``Mesh(n)``).

    Example:
        >>> mesh = Mesh(4)
        >>> mesh.size, mesh.axis_name, mesh.backend_name
        (4, 'dp', 'vmap')
    """

    __slots__ = ("_axis_name", "_backend")

    def __init__(
        self,
        n: int | None = None,
        *,
        axis_name: str = DEFAULT_AXIS_NAME,
        device: torch.device | str | None = None,
        devices: Sequence[torch.device | str] | None = None,
        executor: Executor = "auto",
        timeout: float = 300.0,
    ) -> None:
        self._axis_name = _check_axis_name(axis_name, "Mesh")
        if devices is not None:
            if device is not None:
                raise ValueError("Mesh: give either device (n virtual replicas on one device) "
                                 "or devices (one replica per device), not both")
            if executor != "auto":
                raise ValueError("Mesh: executor= chooses how n virtual replicas on one device "
                                 "run; with devices=[...] every replica is a thread already")
            self._backend: Backend = ThreadsBackend.create(n, devices, timeout)
        elif n is None:
            raise TypeError("Mesh: give the number of replicas, e.g. Mesh(4), or "
                            "devices=[...] for one replica per device")
        else:
            self._backend = VmapBackend.create(n, device, executor, timeout)

    @classmethod
    def from_backend(cls, backend: Backend, axis_name: str = DEFAULT_AXIS_NAME) -> Mesh:
        """A mesh over an already built backend."""
        if not isinstance(backend, Backend):
            raise TypeError(f"Mesh.from_backend: backend must be an fdp.backends.Backend, got "
                            f"{type(backend).__name__}")
        mesh = cls.__new__(cls)
        mesh._axis_name = _check_axis_name(axis_name, "Mesh.from_backend")
        mesh._backend = backend
        return mesh

    @classmethod
    def distributed(
        cls,
        group: Any = None,
        *,
        axis_name: str = DEFAULT_AXIS_NAME,
        device: torch.device | str | None = None,
        timeout: float = 300.0,
        bucket_mb: float = 25.0,
        overlap: bool | None = None,
        shared_memory: bool | None = None,
    ) -> Mesh:
        """One replica per process of an initialized ``torch.distributed`` process group.

        Every process runs the same program with the same params and the same global batch;
        each one plays the replica of its rank in ``group``: ``fdp.scatter`` keeps its own rows,
        collectives are c10d collectives, ``fdp.value_and_grad`` reduces gradients in flat
        buckets overlapped with backward. Replicated values hold this process's replica only
        (a leading axis of size 1). See docs/backends.md.

        Args:
            group: the process group (default: the default group); one replica per rank.
            axis_name: the name collectives use to address this axis inside :func:`fdp.pmap`.
            device: this process's device (default: ``cuda:<LOCAL_RANK>`` on an NCCL group,
                else the CPU).
            timeout: seconds any collective may wait for the other ranks before raising
                ``TimeoutError`` (gloo; NCCL ops are bounded by the process group's timeout).
            bucket_mb: size of the flat gradient buckets (DDP's default, 25 MB; with overlap,
                the first bucket is at most 1 MB so that communication starts early).
            overlap: start each bucket's all-reduce as soon as backward has produced its
                gradients, instead of all buckets after backward. Default: on CUDA devices
                only (on CPU, gloo needs the cores backward uses: measured slower).
            shared_memory: on the CPU, sum the gradient buckets through shared memory
                (``/dev/shm``) instead of gloo's sockets when every rank runs on this host
                (decided on the first step, by every rank together; about twice the gradients'
                bytes per rank). ``None`` (default): where possible, else gloo; ``True``:
                every rank raises where not possible; ``False``: always gloo.
        """
        _check_axis_name(axis_name, "Mesh.distributed")
        backend = DistributedBackend.create(group, device=device, timeout=timeout,
                                            bucket_mb=bucket_mb, overlap=overlap,
                                            shared_memory=shared_memory)
        return cls.from_backend(backend, axis_name)

    @property
    def size(self) -> int:
        """Number of replicas."""
        return self._backend.size

    @property
    def axis_name(self) -> str:
        """Default axis name of :func:`fdp.pmap` over this mesh."""
        return self._axis_name

    @property
    def backend(self) -> Backend:
        """The backend that runs the replicas (:class:`fdp.backends.Backend`)."""
        return self._backend

    @property
    def backend_name(self) -> str:
        """The backend's name, one of ``"vmap"``, ``"threads"`` or ``"distributed"``."""
        return self._backend.name

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The device of each replica."""
        return self._backend.devices

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Mesh) and self._axis_name == other._axis_name
                and self._backend == other._backend)

    def __hash__(self) -> int:
        return hash((self._axis_name, self._backend))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its backend (a threads mesh gets fresh threads on load)."""
        return (Mesh.from_backend, (self._backend, self._axis_name))

    def __repr__(self) -> str:
        return (f"Mesh(size={self.size}, axis_name={self._axis_name!r}, "
                f"backend={self.backend_name!r}, {self._backend.placement()})")


def _rebuild_vmap(n: int, axis_name: str, device: str) -> Mesh:
    """Loads meshes pickled by fdp 0.1 (their pickles name this function)."""
    return Mesh(n, axis_name=axis_name, device=device)


def _rebuild_threads(devices: list[str], axis_name: str, timeout: float) -> Mesh:
    """Loads meshes pickled by fdp 0.1 (their pickles name this function)."""
    return Mesh(devices=devices, axis_name=axis_name, timeout=timeout)


def check_mesh(value: object, fn: str) -> Mesh:
    """``value`` if it is a :class:`Mesh`; else a TypeError that shows how to build one."""
    if not isinstance(value, Mesh):
        raise TypeError(
            f"{fn}: mesh must be an fdp.Mesh, got {type(value).__name__}; e.g. mesh=fdp.Mesh(4)"
        )
    return value


def _check_axis_name(axis_name: object, fn: str) -> str:
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"{fn}: axis_name must be a non-empty str, got {axis_name!r}")
    return axis_name
