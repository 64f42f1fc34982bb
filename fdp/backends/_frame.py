"""Axis frames: the mesh axes bound while a replica runs, which collectives look up by name.

A backend binds one :class:`AxisFrame` around each replica's function (``pmap``'s ``fn``,
``value_and_grad``'s ``loss_fn``); :func:`fdp.psum` and the other collectives find it by its
axis name with :func:`lookup`. Frames are thread-local, so replica threads each see their own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fdp.backends._comm import Communicator

__all__ = ["AxisFrame", "bind_axis", "bound_frames", "lookup"]


@dataclass(frozen=True)
class AxisFrame:
    """One bound mesh axis, as the replica that runs inside it sees it.

    Attributes:
        name: the axis name collectives address.
        size: the number of replicas along the axis (those that run).
        index: this replica's index along the axis: an int64 scalar tensor; on the vmap backend
            it is batched at exactly this axis's vmap level, which is how the collectives' vmap
            rules find their level.
        comm: how replicas exchange values (threads, distributed); ``None`` on the vmap
            backend, whose collectives are vmap rules.
        mask: this replica's real-row mask when the mapped batch was padded (an uneven
            :func:`fdp.scatter`), else ``None``.
        offset: the position of this replica's first row in the full batch (int64 scalar
            tensor) when fdp split the batch, so that per-row randomness follows the example.
        tape: collectives may build one autograd graph across the replicas' threads (see
            :attr:`fdp.backends.Backend.tape_collectives`).
        depth: set (the number of active ``torch.func`` transforms, this axis's vmap
            included) where the vmap backend's fused step binds the frame while torch.compile
            traces it: reductions then use the compile-safe op of
            ``fdp/_collectives/_compiled.py`` instead of failing over to eager.
    """

    name: str
    size: int
    index: torch.Tensor
    comm: Communicator | None = None
    mask: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    tape: bool = False
    depth: int | None = None


class _ThreadFrames(threading.local):
    # set in __init__ (once per thread) rather than on first use: torch.compile would guard
    # on the attribute's presence and compile the first call of a process twice
    def __init__(self) -> None:
        self.frames: list[AxisFrame] = []


_state = _ThreadFrames()


def bound_frames() -> list[AxisFrame]:
    """This thread's bound frames, innermost last."""
    return _state.frames


@contextmanager
def bind_axis(frame: AxisFrame) -> Iterator[None]:
    """Binds ``frame`` for the duration of the ``with`` block (in this thread)."""
    frames = bound_frames()
    frames.append(frame)
    try:
        yield
    finally:
        frames.pop()


def lookup(axis_name: object, fn: str) -> AxisFrame:
    """The innermost bound frame named ``axis_name``; a clear error when there is none."""
    if not isinstance(axis_name, str):
        raise TypeError(f"{fn}: axis_name must be a str, got {type(axis_name).__name__}")
    frames = bound_frames()
    for frame in reversed(frames):
        if frame.name == axis_name:
            return frame
    if not frames:
        raise ValueError(
            f"{fn}: axis name {axis_name!r} is not bound: collectives only work inside a "
            f"function mapped with fdp.pmap(fn, mesh, axis_name={axis_name!r})"
        )
    bound = tuple(f.name for f in reversed(frames))
    raise ValueError(f"{fn}: unknown axis name {axis_name!r}; bound axis names: {bound}")
