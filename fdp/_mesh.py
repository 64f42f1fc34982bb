"""``fdp.Mesh``: where the replicas of one SPMD program live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fdp.backends._base import Backend

DEFAULT_AXIS_NAME = "dp"


class Mesh:
    """A one-dimensional set of replicas and the backend that runs them.

    ``Mesh(n)`` puts ``n`` virtual replicas on one device (the *vmap* backend): a replica is a
    slice of a vmapped axis, and collectives reduce over that axis. Programs written against a
    mesh only use its public surface (``size``, ``axis_name``, ``backend``, ``devices``) and the
    fdp primitives, so the same program runs on the backends that place one replica per device
    or per process.

    Args:
        n: number of replicas (an int ≥ 1).
        axis_name: the name collectives use to address this axis inside :func:`fdp.pmap`.
        device: the device of the vmap backend (default: CPU).
        devices: one replica per listed device, each run by its own thread (the *threads*
            backend), e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu"] * 3``.
        timeout: threads backend: seconds a replica may take (and wait in a collective)
            before the step fails with ``TimeoutError`` instead of hanging.

    Example:
        >>> mesh = Mesh(4)
        >>> mesh.size, mesh.axis_name, mesh.backend
        (4, 'dp', 'vmap')
    """

    __slots__ = ("_axis_name", "_backend", "_devices", "_size")

    def __init__(
        self,
        n: int | None = None,
        *,
        axis_name: str = DEFAULT_AXIS_NAME,
        device: torch.device | str | None = None,
        devices: Sequence[torch.device | str] | None = None,
        timeout: float = 300.0,
    ) -> None:
        if not isinstance(axis_name, str) or not axis_name:
            raise TypeError(f"Mesh: axis_name must be a non-empty str, got {axis_name!r}")
        self._axis_name = axis_name
        if devices is not None:
            self._init_threads(n, device, devices, timeout)
            return
        if n is None:
            raise TypeError("Mesh: give the number of replicas, e.g. Mesh(4), or "
                            "devices=[...] for one replica per device")
        _check_size(n)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        from fdp.backends.vmap import VmapBackend

        self._size = n
        self._devices = (dev,) * n
        self._backend: Backend = VmapBackend(n, dev)

    def _init_threads(self, n: int | None, device: Any, devices: Sequence[Any],
                      timeout: float) -> None:
        if isinstance(devices, (str, torch.device)):
            raise TypeError(f"Mesh: devices must be a list of devices, got {devices!r}; "
                            f"e.g. devices=['cuda:0', 'cuda:1'] or ['cpu'] * 3")
        devs = tuple(torch.device(d) for d in devices)
        if not devs:
            raise ValueError("Mesh: devices is empty; list at least one device")
        if device is not None:
            raise ValueError("Mesh: give either device (n virtual replicas on one device) or "
                             "devices (one replica per device), not both")
        if n is not None and n != len(devs):
            raise ValueError(f"Mesh: n={n} but {len(devs)} devices were listed; drop n")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"Mesh: timeout must be a positive number of seconds, got "
                             f"{timeout!r}")
        from fdp.backends.threads import ThreadsBackend

        self._size = len(devs)
        self._devices = devs
        self._backend = ThreadsBackend(devs, float(timeout))

    @classmethod
    def from_backend(cls, backend: Backend, axis_name: str = DEFAULT_AXIS_NAME) -> Mesh:
        """A mesh over an already built backend (used by :meth:`distributed`)."""
        mesh = cls.__new__(cls)
        mesh._axis_name = axis_name
        mesh._size = backend.size
        mesh._devices = tuple(backend.devices)
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
        """
        from fdp.backends.distributed import DistributedBackend

        if not isinstance(axis_name, str) or not axis_name:
            raise TypeError(f"Mesh.distributed: axis_name must be a non-empty str, got "
                            f"{axis_name!r}")
        backend = DistributedBackend.create(group, device=device, timeout=timeout,
                                            bucket_mb=bucket_mb, overlap=overlap)
        return cls.from_backend(backend, axis_name)

    @property
    def size(self) -> int:
        """Number of replicas."""
        return self._size

    @property
    def axis_name(self) -> str:
        """Default axis name of :func:`fdp.pmap` over this mesh."""
        return self._axis_name

    @property
    def backend(self) -> str:
        """Backend name: ``"vmap"``, ``"threads"`` or ``"distributed"``."""
        return self._backend.name

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The device of each replica."""
        return self._devices

    @property
    def impl(self) -> Backend:
        """The backend object that implements the primitives (internal interface)."""
        return self._backend

    def _key(self) -> tuple:
        if self.backend == "vmap":
            return (self._size, self._axis_name, self.backend, self._devices)
        return (self._axis_name, id(self._backend))  # a backend owns threads or a group

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mesh) and self._key() == other._key()

    def __reduce__(self) -> tuple:
        """Pickles as its constructor call (a threads mesh gets fresh threads on load)."""
        if self.backend == "vmap":
            return (_rebuild_vmap, (self._size, self._axis_name, str(self._devices[0])))
        if self.backend == "threads":
            return (_rebuild_threads, ([str(d) for d in self._devices], self._axis_name,
                                       self._backend.timeout))
        raise TypeError("a distributed Mesh cannot be pickled: it stands for this process's "
                        "process group; build it with fdp.Mesh.distributed() where it is used")

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        where = (f"device={str(self._devices[0])!r}" if self.backend == "vmap"
                 else f"devices={[str(d) for d in self._devices]!r}")
        return (f"Mesh(size={self._size}, axis_name={self._axis_name!r}, "
                f"backend={self.backend!r}, {where})")


def _check_size(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"Mesh: n must be an int, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"Mesh: n must be ≥ 1 replicas, got n={n}")


def _rebuild_vmap(n: int, axis_name: str, device: str) -> Mesh:
    return Mesh(n, axis_name=axis_name, device=device)


def _rebuild_threads(devices: list[str], axis_name: str, timeout: float) -> Mesh:
    return Mesh(devices=devices, axis_name=axis_name, timeout=timeout)
