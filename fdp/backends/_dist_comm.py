"""``DistComm``: the :class:`~fdp.backends._comm.Communicator` of the distributed backend.

Every operation goes through ``torch.distributed`` on one process group (gloo on CPU, NCCL on
GPU), out of place, as an async op whose wait is bounded by the mesh's timeout: a peer that
died or is stuck makes the wait raise instead of hanging.

User-facing collectives first compare a fingerprint of ``(operation, dtype, shape)`` across the
ranks (one all-gather of a single int64 per rank), so that ranks that pass different shapes, or
that call different collectives, get a ``ValueError`` naming every rank's tensor instead of
garbage. Gradient buckets skip that check: ``value_and_grad`` checks the params once per call.

Buckets (:meth:`DistComm.reduce_buckets`, ``value_and_grad``'s gradients) are summed through
shared memory instead of gloo's sockets when every rank is on this host and the mesh is on
the CPU (:mod:`fdp.backends._host_arena`); everything else goes through the process group.
"""

from __future__ import annotations

import dataclasses
import datetime
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fdp.backends import _dist_exit, _host_arena
from fdp.backends._comm import Communicator
from fdp.backends._host_arena import HostArena, Region
from fdp.backends._options import ReduceOp
from fdp.backends._recycled import Recycled

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN}
FIRST_BUCKET_BYTES = 1 << 20  # as DDP: a small first bucket starts communication early

_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclasses.dataclass
class Launched:
    """A bucket's reduction in flight: gloo's ``work`` on ``flat``, or, through shared memory,
    the barrier's ``work`` and the bucket's ``region`` (see ``_host_arena``)."""

    work: Any
    flat: torch.Tensor | None = None
    region: Region | None = None


class PeerFailure(RuntimeError):
    """A collective failed because another rank failed, exited or closed its connection."""


class PeerTimeout(PeerFailure, TimeoutError):
    """A collective waited longer than the mesh's timeout for the other ranks."""


class DistComm(Communicator):
    """Collectives over ``group`` for the calling process, which is replica ``index()``.

    Args:
        group: the process group (``None``: the default group).
        device: where this process's tensors live (``cpu`` for gloo, ``cuda:k`` for NCCL).
        timeout: seconds any one operation may wait for the other ranks.
        bucket_bytes: the size of the flat buffers that :meth:`all_reduce_many` coalesces into.
        shared_memory: sum buckets through shared memory where every rank is on this host
            (``None``: where possible; ``True``: raise where not; ``False``: never).
    """

    def __init__(self, group: Any, device: torch.device, timeout: float,
                 bucket_bytes: int, shared_memory: bool | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device
        self.timeout = timeout
        self.bucket_bytes = bucket_bytes
        # NCCL's wait(timeout) would block the host on every op; its watchdog (the process
        # group's timeout) bounds NCCL ops instead. gloo honours the per-wait timeout.
        self._timed = "nccl" not in str(dist.get_backend(group)).lower() or device.type != "cuda"
        self._delta = datetime.timedelta(seconds=timeout)
        self.shared_memory = shared_memory
        # "untried" until the first call with buckets decides, on every rank together; then
        # "on", "off" or "refused" (shared_memory=True on some rank, and not possible)
        self._sharing = "off" if self.size == 1 else "untried"
        self._refusal = ""
        self._insisted = False  # whether any rank passed shared_memory=True (see _decide)
        self._arena: HostArena | None = None
        self._unwaited: list[Any] = []  # barriers started and not yet waited for
        self._flag = torch.zeros(1, dtype=torch.int64, device=device)
        self._recycled = Recycled()  # the buckets' flat buffers, reused once dead

    def index(self) -> int:
        return self.rank

    # --- waiting and checking --------------------------------------------------------------

    def wait(self, work: Any, fn: str) -> None:
        """Waits for ``work`` within the timeout; a dead or stuck peer raises, naming ``fn``.

        The failure also marks the process group as failed: at exit, the process then leaves
        at once with code 1 instead of waiting for the operation in flight (``_dist_exit``).
        """
        try:
            if self._timed:
                work.wait(self._delta)
            else:
                work.wait()
        except RuntimeError as e:
            error = self.failure(fn, e)
            _dist_exit.record(error, self.group)  # exit at once, non-zero (see there)
            raise error from e

    def failure(self, fn: str, error: BaseException) -> PeerFailure:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f"replica {self.rank} of {self.size} (global rank {dist.get_rank()})"
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            return PeerTimeout(
                f"{fn} on a distributed mesh: {where} waited {self.timeout:g} s for the other "
                f"ranks (fdp.Mesh.distributed(timeout=...)); another rank failed, exited or is "
                f"stuck before this collective. The process group is unusable now: exit and "
                f"restart ({text})"
            )
        return PeerFailure(
            f"{fn} on a distributed mesh failed in {where}: another rank exited or closed its "
            f"connection ({text}). The process group is unusable now: exit and restart"
        )

    def start_check(self, parts: list[str], fn: str) -> PendingCheck:
        """Starts comparing a description (``parts``) across ranks; ``verify()`` finishes it."""
        if self.size == 1:  # nobody to disagree with
            return PendingCheck(self, None, None, parts, fn)
        code = zlib.crc32("\n".join(parts).encode())
        mine = torch.tensor([code], dtype=torch.int64, device=self.device)
        out = torch.empty(self.size, dtype=torch.int64, device=self.device)
        work = _gather_single(out, mine, group=self.group, async_op=True)
        return PendingCheck(self, work, out, parts, fn)

    def check(self, parts: list[str], fn: str) -> None:
        self.start_check(parts, fn).verify()

    # --- collectives -------------------------------------------------------------------------

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=self.device)
        return out.copy_(x.detach())

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        fn = {"sum": "psum", "mean": "pmean", "max": "pmax", "min": "pmin"}[op]
        self.check([fn, _kind(x)], fn)
        return self._all_reduce(self._copy(x), op, fn)

    def _all_reduce(self, buf: torch.Tensor, op: ReduceOp, fn: str) -> torch.Tensor:
        self.wait(dist.all_reduce(buf, _OPS[op], group=self.group, async_op=True), fn)
        if op == "mean":
            buf /= self.size
        return buf

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.check(["all_gather", _kind(x)], "all_gather")
        out = torch.empty(self.size * x.numel(), dtype=x.dtype, device=self.device)
        work = _gather_single(out, self._copy(x).reshape(-1), group=self.group, async_op=True)
        self.wait(work, "all_gather")
        return out.view(self.size, *x.shape)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.check([f"broadcast from {src}", _kind(x)], "broadcast")
        buf = self._copy(x) if self.rank == src else torch.empty(x.shape, dtype=x.dtype,
                                                                  device=self.device)
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        self.wait(dist.broadcast(buf, root, group=self.group, async_op=True), "broadcast")
        return buf

    def all_reduce_many(self, xs: list[torch.Tensor], op: ReduceOp) -> list[torch.Tensor]:
        """One checked call for all of ``xs``, reduced in flat buckets of ``bucket_bytes``."""
        self.check([f"all_reduce {op} of {len(xs)}", *(_kind(x) for x in xs)], "all_reduce")
        return self.reduce_buckets(xs, op, plan_buckets(xs, self.bucket_bytes), "all_reduce")

    def reduce_buckets(self, xs: Sequence[torch.Tensor], op: ReduceOp,
                       buckets: list[list[int]], fn: str) -> list[torch.Tensor]:
        """Unchecked: every bucket's all-reduce starts at once, then all are awaited."""
        self.prepare(bucket_sizes(xs, buckets), fn)
        launched = [self.launch(xs, idx, op) for idx in buckets]
        out: list[torch.Tensor | None] = [None] * len(xs)
        for idx, started in zip(buckets, launched, strict=True):
            for i, part in zip(idx, self.finish(started, op, fn, [xs[i] for i in idx]),
                               strict=True):
                out[i] = part
        return out  # type: ignore[return-value]

    def prepare(self, sizes: list[tuple[torch.dtype, int]], fn: str) -> None:
        """Before the buckets of one call, ``(dtype, numel)`` each: every rank calls it with
        the same sizes (the callers check that first). Decides on the first call whether the
        ranks share memory, and maps more of it when a call needs more, collectively."""
        if self._sharing == "untried":
            self._decide(fn)
        if self._sharing == "refused":
            raise RuntimeError(self._refusal)
        if self._sharing == "off":
            return
        for work in self._unwaited:  # an abandoned call's barrier: see _host_arena
            self.wait(work, fn)
        self._unwaited.clear()
        need = _host_arena.call_bytes(sizes, self.size)
        if self._arena is None or need > self._arena.capacity:
            self._arena = None  # unmapped before the new segments take room in /dev/shm
            self._open(max(need, 1 << 16), fn)
        if self._arena is not None:
            self._arena.begin()

    def _decide(self, fn: str) -> None:
        """Every rank says whether it may share memory and whether it insists; all ranks
        take the same decision from the sums (one all-reduce, on the first call only)."""
        may = self.shared_memory is not False and _host_arena.can_share(self.device)
        votes = torch.tensor([int(may), int(self.shared_memory is True)],
                             dtype=torch.int64, device=self.device)
        total = self._all_reduce(votes, "sum", fn).tolist()
        self._insisted = total[1] > 0  # the same on every rank
        if total[0] == self.size:
            self._sharing = "on"
        elif total[1] > 0:
            self._refuse(fn, "a rank passed shared_memory=False or runs on a device other "
                             "than the CPU")
        else:
            self._sharing = "off"

    def _open(self, capacity: int, fn: str) -> None:
        self._arena = _host_arena.open_arena(self.rank, self.size, capacity,
                                             lambda flag, op: self._all_reduce(flag, op, fn))
        if self._arena is not None:
            return
        if self._insisted:
            self._refuse(fn, f"a rank runs on another host, or {_host_arena.SHM_DIR} is "
                             f"missing or lacks {2 * capacity} bytes per rank")
            raise RuntimeError(self._refusal)
        self._sharing = "off"

    def _refuse(self, fn: str, why: str) -> None:
        self._sharing = "refused"
        self._refusal = (f"{fn}: Mesh.distributed(shared_memory=True) on some rank, but the "
                         f"ranks cannot share memory: {why}. Pass shared_memory=None (use it "
                         f"where possible) or False on every rank")

    def launch(self, xs: Sequence[torch.Tensor], idx: list[int], op: ReduceOp) -> Launched:
        """Starts reducing ``xs[idx]``, flattened into one buffer (after :meth:`prepare`)."""
        parts = [xs[i].detach().reshape(-1).to(self.device) for i in idx]
        if self._arena is not None:
            region = self._arena.take(parts[0].dtype, sum(p.numel() for p in parts))
            torch.cat(parts, out=region.inputs[self.rank])
            work = self._start_barrier()
            self._unwaited.append(work)
            return Launched(work, region=region)
        flat = torch.cat(parts, out=self._recycled.empty(parts[0].dtype,
                                                         sum(p.numel() for p in parts),
                                                         self.device))
        return Launched(dist.all_reduce(flat, _OPS[op], group=self.group, async_op=True), flat)

    def _start_barrier(self) -> Any:
        """A one-element all-reduce: once it completes, every rank has reached it."""
        work = dist.all_reduce(self._flag.clone(), group=self.group, async_op=True)
        if self._arena is not None:
            self._arena.barrier_started()
        return work

    def finish(self, started: Launched, op: ReduceOp, fn: str,
               like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Waits for a launched bucket and splits it into views shaped like ``like``."""
        self.wait(started.work, fn)
        if started.region is not None and self._arena is not None:
            self._unwaited.remove(started.work)
            mine = started.region.inputs[self.rank]
            out = self._recycled.empty(mine.dtype, mine.numel(), self.device)
            flat = self._arena.combine(started.region, op, out,
                                       lambda: self.wait(self._start_barrier(), fn))
        else:
            assert started.flat is not None
            flat = started.flat
            if op == "mean":
                flat /= self.size
        parts = flat.split([x.numel() for x in like])
        return [p.view(x.shape) for p, x in zip(parts, like, strict=True)]


class PendingCheck:
    """A fingerprint comparison in flight (see :meth:`DistComm.start_check`)."""

    def __init__(self, comm: DistComm, work: Any, out: torch.Tensor | None, parts: list[str],
                 fn: str) -> None:
        self.comm, self.work, self.out, self.parts, self.fn = comm, work, out, parts, fn

    def verify(self) -> None:
        """Raises ``ValueError`` on every rank if the descriptions differ anywhere."""
        if self.work is None or self.out is None:
            return
        self.comm.wait(self.work, self.fn)
        if bool((self.out == self.out[0]).all()):
            return
        comm = self.comm
        seen: list[Any] = [None] * comm.size
        dist.all_gather_object(seen, self.parts, group=comm.group)
        raise ValueError(mismatch_message(self.fn, seen))


def mismatch_message(fn: str, seen: list[list[str]]) -> str:
    """Names the first part of the descriptions where the ranks differ, with every rank's.

    Example:
        >>> msg = mismatch_message("psum", [["psum", "float32[3]"], ["psum", "float32[4]"]])
        >>> msg.split("; ")[0]
        'psum: the ranks of the distributed mesh disagree: rank 0: float32[3], rank 1: float32[4]'
    """
    longest = max(len(s) for s in seen)
    at = next((i for i in range(longest)
               if len({s[i] if i < len(s) else "<nothing>" for s in seen}) > 1), 0)
    per = ", ".join(f"rank {r}: {s[at] if at < len(s) else '<nothing>'}"
                    for r, s in enumerate(seen))
    if fn == "value_and_grad":
        hint = ("every rank must pass the same params and the same global batch (each rank "
                "takes its own rows of it)")
    else:
        hint = ("every rank must call the same collectives in the same order with tensors "
                "of the same shape and dtype")
    return f"{fn}: the ranks of the distributed mesh disagree: {per}; {hint}"


def _kind(x: torch.Tensor) -> str:
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}".replace(" ", "")


def bucket_sizes(xs: Sequence[torch.Tensor],
                 buckets: list[list[int]]) -> list[tuple[torch.dtype, int]]:
    """``(dtype, numel)`` of each bucket of ``xs``."""
    return [(xs[idx[0]].dtype, sum(xs[i].numel() for i in idx)) for idx in buckets]


def plan_buckets(xs: Sequence[torch.Tensor], bucket_bytes: int,
                 first_bytes: int | None = None) -> list[list[int]]:
    """Groups ``xs`` (in the given order) into single-dtype buckets of about ``bucket_bytes``.

    A bucket closes once it holds ``bucket_bytes`` (the first one ``first_bytes``); buckets are
    listed in the order they were opened, which is the order they must be launched in.

    Example:
        >>> xs = [torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(5)]
        >>> plan_buckets(xs, 16)
        [[0, 2], [1]]
    """
    buckets: list[list[int]] = []
    open_: dict[torch.dtype, tuple[int, int]] = {}  # dtype -> (bucket index, bytes so far)
    for i, x in enumerate(xs):
        b, size = open_.get(x.dtype) or (len(buckets), 0)
        if b == len(buckets):
            buckets.append([])
        buckets[b].append(i)
        size += x.numel() * x.element_size()
        cap = first_bytes if b == 0 and first_bytes is not None else bucket_bytes
        if size >= cap:
            open_.pop(x.dtype, None)
        else:
            open_[x.dtype] = (b, size)
    return buckets
