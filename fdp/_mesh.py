"""``fdp.Mesh``: where the replicas of one SPMD program live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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
        devices: one replica per listed device (the threads backend; not available yet).

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
    ) -> None:
        if not isinstance(axis_name, str) or not axis_name:
            raise TypeError(f"Mesh: axis_name must be a non-empty str, got {axis_name!r}")
        if devices is not None:
            devices = list(devices)
            if not devices:
                raise ValueError("Mesh: devices is empty; list at least one device")
            raise NotImplementedError(
                "Mesh(devices=...) (one replica per device, the threads backend) is not "
                "available yet; use Mesh(n) for n virtual replicas on one device"
            )
        if n is None:
            raise TypeError("Mesh: give the number of replicas, e.g. Mesh(4)")
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"Mesh: n must be an int, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"Mesh: n must be ≥ 1 replicas, got n={n}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        from fdp.backends.vmap import VmapBackend

        self._size = n
        self._axis_name = axis_name
        self._devices = (dev,) * n
        self._backend: Backend = VmapBackend(n, dev)

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
        """Backend name: ``"vmap"`` (more backends plug in behind the same interface)."""
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
        return (self._size, self._axis_name, self.backend, self._devices)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mesh) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Mesh(size={self._size}, axis_name={self._axis_name!r}, "
            f"backend={self.backend!r}, device={str(self._devices[0])!r})"
        )
