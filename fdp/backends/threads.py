"""The threads backend: one replica per device, each running in its own thread of this process.

Replicated values outside ``pmap`` are stacked tensors on the first device (the *home*
device), as on the vmap backend; ``pmap`` and ``value_and_grad`` copy each replica's part to
its device (one coalesced copy per dtype), run the replicas in parallel threads, and the
collectives meet in an in-process rendezvous. Reductions are symmetric: replica ``i`` reduces
the ``i``-th chunk of every replica's tensor (a reduce-scatter), then every replica collects
all chunks (an all-gather), so no device accumulates everything, and every replica gets
bit-identical results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from fdp.backends._comm import Communicator
from fdp.backends._spmd import SpmdBackend
from fdp.backends.vmap import VmapBackend


class ReplicaAborted(RuntimeError):
    """Raised in a replica whose peers failed or stopped answering during a collective."""


class ThreadComm(Communicator):
    """An in-process rendezvous of ``len(devices)`` replica threads."""

    def __init__(self, devices: tuple[torch.device, ...], timeout: float) -> None:
        self.size = len(devices)
        self.devices = devices
        self.timeout = timeout
        self._barrier = threading.Barrier(self.size, timeout=timeout)
        self._inputs: list[Any] = [None] * self.size
        self._outputs: list[Any] = [None] * self.size
        self._local = threading.local()

    def bind(self, index: int | None) -> None:
        self._local.index = index

    def index(self) -> int:
        index = getattr(self._local, "index", None)
        if index is None:
            raise RuntimeError("fdp internal error: a collective ran outside a replica thread")
        return index

    def pinned(self) -> Communicator:
        return _Pinned(self, self.index())

    def tracked_all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce whose result is computed from every replica's tracked input (autograd
        then differentiates across replicas without any communication in backward)."""
        stacked = self.tracked_all_gather(x)
        if op == "sum":
            return stacked.sum(0)
        if op == "mean":
            return stacked.mean(0)
        return stacked.amax(0) if op == "max" else stacked.amin(0)

    def tracked_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.devices[self.index()]
        values = self._deposit(x)
        self._check_same(values, "all_gather")
        out = torch.stack([v.to(dev) for v in values])
        self._wait()
        return out

    def abort(self) -> None:
        self._barrier.abort()

    def reset(self) -> None:
        self._barrier.reset()

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise ReplicaAborted(
                f"replica {self.index()} stopped waiting in a collective: another replica "
                f"failed or did not reach it within {self.timeout} s"
            ) from None

    def _deposit(self, value: Any) -> list[Any]:
        """Puts ``value`` in this replica's slot and returns every replica's, in order."""
        self._inputs[self.index()] = value
        self._wait()
        return list(self._inputs)

    def _check_same(self, values: list[torch.Tensor], fn: str) -> None:
        kinds = {(tuple(v.shape), v.dtype) for v in values}
        if len(kinds) > 1:
            per = ", ".join(f"replica {i}: {v.dtype}{list(v.shape)}" for i, v in
                            enumerate(values))
            raise ValueError(f"{fn}: replicas passed tensors of different shapes or dtypes "
                             f"({per}); every replica must pass the same shape and dtype")

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        me, dev = self.index(), self.devices[self.index()]
        values = self._deposit(x)
        self._check_same(values, "psum/all_reduce")
        # reduce-scatter: this replica reduces chunk `me` of everyone's tensor, in index order
        chunks = [v.reshape(-1).tensor_split(self.size)[me].to(dev) for v in values]
        part = chunks[0].clone()
        for c in chunks[1:]:
            if op in ("sum", "mean"):
                part += c
            elif op == "max":
                torch.maximum(part, c, out=part)
            else:
                torch.minimum(part, c, out=part)
        if op == "mean":
            part /= self.size
        self._outputs[me] = part
        self._wait()
        out = torch.cat([p.to(dev) for p in self._outputs]).view(x.shape)
        self._wait()  # nobody overwrites the slots before everyone has read them
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.devices[self.index()]
        values = self._deposit(x)
        self._check_same(values, "all_gather")
        out = torch.stack([v.to(dev) for v in values])
        self._wait()
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dev = self.devices[self.index()]
        values = self._deposit(x)
        out = values[src].to(dev, copy=True)
        self._wait()
        return out

    def all_reduce_many(self, xs: list[torch.Tensor], op: str) -> list[torch.Tensor]:
        """One flat all-reduce per dtype (a single bucket: in-process copies are cheap)."""
        out: list[torch.Tensor | None] = [None] * len(xs)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(xs):
            by_dtype.setdefault(x.dtype, []).append(i)
        for idx in sorted(by_dtype.values()):
            flat = torch.cat([xs[i].reshape(-1) for i in idx])
            reduced = self.all_reduce(flat, op)
            for i, part in zip(idx, reduced.split([xs[i].numel() for i in idx]), strict=True):
                out[i] = part.view(xs[i].shape)
        return out  # type: ignore[return-value]


class _Pinned(Communicator):
    """A :class:`ThreadComm` seen as one fixed replica, from whichever thread calls it."""

    def __init__(self, comm: ThreadComm, index: int) -> None:
        self.comm, self.size, self._index = comm, comm.size, index

    def index(self) -> int:
        return self._index

    def pinned(self) -> Communicator:
        return self

    def _call(self, name: str, *args: Any) -> Any:
        previous = getattr(self.comm._local, "index", None)
        self.comm.bind(self._index)
        try:
            return getattr(self.comm, name)(*args)
        finally:
            self.comm.bind(previous)

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return self._call("all_reduce", x, op)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("all_gather", x)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._call("broadcast", x, src)


class ThreadsBackend(SpmdBackend):
    """One replica per listed device, each replica's work in its own thread."""

    name = "threads"

    def __init__(self, devices: tuple[torch.device, ...], timeout: float) -> None:
        self.size = len(devices)
        self.devices = devices
        self.device = devices[0]  # the stacked representation's home (see VmapBackend)
        self.timeout = timeout
        self._comm = ThreadComm(devices, timeout)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # one step at a time per mesh

    replicate = VmapBackend.replicate
    unreplicate = VmapBackend.unreplicate
    shard = VmapBackend.shard
    unshard = VmapBackend.unshard
    all_reduce = VmapBackend.all_reduce

    @property
    def local_replicas(self) -> tuple[int, ...]:
        return tuple(range(self.size))

    def comm(self) -> ThreadComm:
        return self._comm

    def run_replicas(self, fn: Callable[[int], Any]) -> list[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="fdp-replica")
            grad_mode = torch.is_grad_enabled()
            futures = [self._pool.submit(self._replica, fn, r, grad_mode)
                       for r in range(self.size)]
            outcomes = []
            for r, future in enumerate(futures):
                try:
                    outcomes.append(future.result(timeout=self.timeout))
                except FutureTimeout:
                    self._comm.abort()
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None  # a stuck thread keeps its worker; start fresh ones
                    self._comm = ThreadComm(self.devices, self.timeout)
                    raise TimeoutError(
                        f"replica {r} (device {self.devices[r]}) did not finish within "
                        f"{self.timeout} s (fdp.Mesh(devices=..., timeout=...)); the other "
                        f"replicas were stopped"
                    ) from None
            return self._results(outcomes)

    tape_collectives = True

    def _replica(self, fn: Callable[[int], Any], r: int, grad_mode: bool) -> tuple:
        self._comm.bind(r)
        try:
            with torch.set_grad_enabled(grad_mode), _device_guard(self.devices[r]):
                return True, fn(r)
        except BaseException as e:  # re-raised by the caller; peers must not wait for us
            self._comm.abort()
            return False, e
        finally:
            self._comm.bind(None)

    def _results(self, outcomes: list[tuple]) -> list[Any]:
        failures = [(r, e) for r, (ok, e) in enumerate(outcomes) if not ok]
        if not failures:
            return [value for _, value in outcomes]
        self._comm.reset()
        # the first replica that failed on its own, not because a peer aborted the rendezvous
        r, error = next(((r, e) for r, e in failures if not isinstance(e, ReplicaAborted)),
                        failures[0])
        error.add_note(f"raised in replica {r} of {self.size} (device {self.devices[r]}) "
                       f"of a threads mesh")
        raise error


def _device_guard(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()
