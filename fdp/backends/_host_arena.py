"""``HostArena``: gradient buckets summed through shared memory, for ranks on one host.

gloo moves every byte of an all-reduce through TCP sockets, also between processes of one
machine; an all-reduce of 2.7 MB between two ranks took 5.4 ms here, against 1.9 ms through
shared memory (docs/performance.md). When every rank of a CPU process group can map the same
files in ``/dev/shm``, a bucket is summed as follows instead:

1. each rank writes its bucket into its own *segment* (the flat copy that gloo's path makes
   anyway);
2. a one-element gloo all-reduce, bounded by the mesh's timeout, is the barrier that says every
   rank has written (a dead or stuck peer makes it raise, as any collective);
3. every rank sums the ranks' copies in rank order into a new tensor: the same operations on
   the same numbers, so every rank gets the same bits (with two ranks, the same bits as gloo).

With more than two ranks and a bucket of :data:`SCATTER_BYTES` or more, step 3 would make every
rank read every rank's copy (N times the bucket); instead each rank sums one N-th of the bucket
(over the ranks, in rank order) into a result region of its segment, a second barrier follows,
and every rank copies the N results: twice the bucket read per rank, whatever N. Each element
is still the same sum in the same order, so the bits equal step 3's.

Segments are reused without another barrier: each has two halves, and calls (one sequence of
buckets each, one :meth:`HostArena.begin`) alternate between them. A rank starts call ``c``
only after waiting for call ``c - 1``'s first barrier (also when that call was abandoned, say
by an exception in backward), which no rank enters before finishing the reads of call
``c - 2``, the last user of the half that ``c`` writes. A call that started no barrier leaves
the half to the next call. Within a call, buckets take consecutive regions.

The files are unlinked as soon as every rank has mapped them: nothing outlives the processes.
Space is reserved with ``posix_fallocate``, so a full ``/dev/shm`` (64 MB in a default Docker
container) makes the ranks fall back to gloo together instead of failing later with SIGBUS.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from fdp._layout import Layout, split_sizes
from fdp.backends._options import ReduceOp

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: each bucket's region starts on a cache line
SCATTER_BYTES = 1 << 18  # buckets from this size, over more than 2 ranks, are summed in parts
Barrier = Callable[[torch.Tensor, ReduceOp], torch.Tensor]
_REDUCE: dict[str, Callable[..., torch.Tensor]] = {
    "sum": torch.add, "mean": torch.add, "max": torch.maximum, "min": torch.minimum}


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def scatters(nbytes: int, ranks: int) -> bool:
    """Whether a bucket of ``nbytes`` over ``ranks`` ranks is summed in parts (see above)."""
    return ranks > 2 and nbytes >= SCATTER_BYTES


def call_bytes(sizes: Sequence[tuple[torch.dtype, int]], ranks: int) -> int:
    """The bytes one call's buckets take in a half segment: ``(dtype, numel)`` per bucket
    (for a bucket summed in parts, also the rank's part of the result).

    Example:
        >>> call_bytes([(torch.float32, 3), (torch.float64, 10)], 2)
        192
    """
    total = 0
    for d, n in sizes:
        total += aligned(n * d.itemsize)
        if scatters(n * d.itemsize, ranks):
            total += aligned(parts(n, ranks).max_size * d.itemsize)
    return total


class Region:
    """One bucket's place in every rank's segment: the ranks' copies (``inputs``) and, for a
    bucket summed in parts, where each rank puts its part of the result (``results[r]``
    holds rank ``r``'s part, from its start)."""

    def __init__(self, inputs: list[torch.Tensor], results: list[torch.Tensor] | None) -> None:
        self.inputs, self.results = inputs, results


class HostArena:
    """Every rank's segment, mapped in this process; one half per call (module docstring).

    Built by :func:`open_arena`, collectively. ``capacity`` is the bytes of one half.
    """

    def __init__(self, rank: int, segments: list[torch.Tensor], capacity: int) -> None:
        self.rank, self.segments, self.capacity = rank, segments, capacity
        self.half = 1
        self.synced = True  # whether the call that used ``half`` started a barrier
        self.used = 0

    def begin(self) -> None:
        """Starts a call: the other half, from its start, if the last call started a barrier
        (the caller waits for it before this); else the same half, which no rank can be
        reading: nobody got past that call's start without a barrier."""
        if self.synced:
            self.half = 1 - self.half
        self.synced = False
        self.used = 0

    def barrier_started(self) -> None:
        """Notes that this call has started a barrier (once every rank has written)."""
        self.synced = True

    def take(self, dtype: torch.dtype, numel: int) -> Region:
        """The next region of this call, as flat ``dtype`` views in every rank's segment."""
        nbytes, ranks = numel * dtype.itemsize, len(self.segments)
        inputs = self._views(dtype, nbytes)
        results = (self._views(dtype, parts(numel, ranks).max_size * dtype.itemsize)
                   if scatters(nbytes, ranks) else None)
        return Region(inputs, results)

    def _views(self, dtype: torch.dtype, nbytes: int) -> list[torch.Tensor]:
        start = self.half * self.capacity + self.used
        if self.used + nbytes > self.capacity:
            raise RuntimeError("HostArena: a call's buckets outgrew the reserved capacity")
        self.used += aligned(nbytes)
        return [s[start:start + nbytes].view(dtype) for s in self.segments]

    def combine(self, region: Region, op: ReduceOp, out: torch.Tensor,
                barrier: Callable[[], None]) -> torch.Tensor:
        """``op`` over the ranks' copies into ``out``, once every rank has written its copy;
        a bucket summed in parts calls ``barrier()`` (all ranks) between the two steps."""
        if region.results is None:
            return self.reduce(region.inputs, op, out)
        layout = parts(out.numel(), len(self.segments))
        lo, n = layout.offsets[self.rank], layout.sizes[self.rank]
        self.reduce([x[lo:lo + n] for x in region.inputs], op, region.results[self.rank][:n])
        barrier()  # every rank has written its part of the result
        for j, (lo, n) in enumerate(zip(layout.offsets, layout.sizes, strict=True)):
            out[lo:lo + n].copy_(region.results[j][:n])
        return out

    @staticmethod
    def reduce(regions: list[torch.Tensor], op: ReduceOp,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``op`` over every rank's region, in rank order, into ``out`` (or a new tensor)."""
        fn = _REDUCE[op]
        out = fn(regions[0], regions[1], out=out)
        for r in regions[2:]:
            fn(out, r, out=out)
        if op == "mean":
            out /= len(regions)
        return out


def parts(numel: int, ranks: int) -> Layout:
    """Each rank's part of a bucket of ``numel`` elements: ``split="even"``'s rule.

    Example:
        >>> parts(10, 3).sizes, parts(10, 3).offsets
        ((4, 3, 3), (0, 4, 7))
    """
    return Layout(split_sizes(numel, ranks, "even"))


def open_arena(rank: int, size: int, capacity: int,
               barrier: Barrier) -> HostArena | None:
    """Collectively maps a segment of ``2 * capacity`` bytes per rank, or ``None`` on every
    rank if any rank cannot (another host, no ``/dev/shm``, not enough space there).

    ``barrier(flag, op)`` all-reduces a one-element int64 tensor over the group (``op`` is
    ``"min"`` or ``"max"``), within the mesh's timeout.
    """
    token = barrier(torch.tensor([secrets.randbits(62) if rank == 0 else 0]), "max")
    path = os.path.join(SHM_DIR, f"fdp-{int(token.item()):x}-{{}}")
    mine = _create(path.format(rank), 2 * capacity)
    segments: list[torch.Tensor] = []
    try:
        if _all(barrier, mine is not None):  # every rank created its file
            maps = [mine if r == rank else _map(path.format(r), 2 * capacity)
                    for r in range(size)]
            segments = [s for s in maps if s is not None]
        ok = _all(barrier, len(segments) == size)
    finally:
        if mine is not None:  # every rank has mapped it (or given up): the name can go
            os.unlink(path.format(rank))
    return HostArena(rank, segments, capacity) if ok else None


def _all(barrier: Barrier, ok: bool) -> bool:
    return bool(barrier(torch.tensor([int(ok)]), "min").item())


def _create(path: str, nbytes: int) -> torch.Tensor | None:
    if os.name != "posix" or not os.path.isdir(SHM_DIR):
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)  # reserves the pages: ENOSPC now, not SIGBUS later
        mapped = _mapped(fd, nbytes)
    except OSError:
        mapped = None
    finally:
        os.close(fd)  # a mapping stays valid without its descriptor
    if mapped is None:
        os.unlink(path)
    return mapped


def _map(path: str, nbytes: int) -> torch.Tensor | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # not there: another host (or another /dev/shm)
        return None
    try:
        return _mapped(fd, nbytes) if os.fstat(fd).st_size == nbytes else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _mapped(fd: int, nbytes: int) -> torch.Tensor:
    buf = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(buf, dtype=torch.uint8)


def can_share(device: torch.device) -> bool:
    """Whether a mesh on ``device`` may use shared memory at all (CPU tensors, POSIX)."""
    return device.type == "cpu" and os.name == "posix" and dist.is_available()
