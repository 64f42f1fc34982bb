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

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from fdp import _check, _explain
from fdp._compat import add_note
from fdp.backends._comm import Communicator
from fdp.backends._options import ReduceOp
from fdp.backends._spmd import SpmdBackend
from fdp.backends._stacked import StackedPlacement
from fdp.backends._workers import ReplicaThreads


class ReplicaAborted(RuntimeError):
    """Raised in a replica whose peers failed or stopped answering during a collective."""


class ThreadComm(Communicator):
    """An in-process rendezvous of ``len(devices)`` replica threads.

    Every operation deposits a *tag* (operation, reduction, shape, dtype) with its value; the
    replicas compare tags after the first barrier, so replicas that call different collectives
    or pass different shapes all raise the same ``ValueError`` instead of mixing data.
    """

    forward_ad = False  # torch's forward-AD levels are process-wide, not per thread

    def __init__(self, devices: Sequence[torch.device], timeout: float,
                 replicas: Sequence[int] | None = None) -> None:
        self.size = len(devices)
        self.devices = tuple(devices)
        self.timeout = timeout
        # the backend's replica index of each member (a subset communicator maps them)
        self.replicas = tuple(replicas) if replicas is not None else tuple(range(self.size))
        self._position = {r: i for i, r in enumerate(self.replicas)}
        self._barrier = threading.Barrier(self.size, timeout=timeout)
        self._inputs: list[Any] = [None] * self.size
        self._outputs: list[Any] = [None] * self.size
        self._local = threading.local()
        self.waiting: set[int] = set()  # members blocked in a barrier (to name stuck ones)
        self._subsets: dict[tuple[int, ...], ThreadComm] = {}
        self._subsets_lock = threading.Lock()  # every replica thread asks for the subset

    def bind(self, replica: int | None) -> None:
        self._local.replica = replica

    def index(self) -> int:
        replica = getattr(self._local, "replica", None)
        if replica is None or replica not in self._position:
            raise RuntimeError("fdp internal error: a collective ran outside a replica thread")
        return self._position[replica]

    def pinned(self) -> Communicator:
        return _Pinned(self, self.replicas[self.index()])

    def subset(self, replicas: tuple[int, ...]) -> ThreadComm:
        """A communicator over some replicas only (those of a step that received rows)."""
        if replicas == self.replicas:
            return self
        with self._subsets_lock:
            if replicas not in self._subsets:
                sub = ThreadComm([self.devices[self._position[r]] for r in replicas],
                                 self.timeout, replicas)
                sub._local = self._local  # the same threads, bound to the same replica indices
                self._subsets[replicas] = sub
            return self._subsets[replicas]

    def abort(self) -> None:
        self._barrier.abort()
        for sub in self._subsets.values():
            sub.abort()

    def reset(self) -> None:
        self._barrier.reset()
        self.waiting.clear()
        for sub in self._subsets.values():
            sub.reset()

    def _wait(self) -> None:
        me = self.index()
        self.waiting.add(me)
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise ReplicaAborted(
                f"replica {self.replicas[me]} stopped waiting in a collective: another replica "
                f"failed or did not reach it within {self.timeout} s"
            ) from None
        finally:
            self.waiting.discard(me)

    def _deposit(self, value: Any, tag: tuple) -> list[Any]:
        """Puts ``(tag, value)`` in this replica's slot; returns every replica's value."""
        self._inputs[self.index()] = (tag, value)
        self._wait()
        slots = list(self._inputs)
        tags = [t for t, _ in slots]
        if any(t != tags[0] for t in tags):
            per = ", ".join(f"replica {r}: {_describe(t)}"
                            for r, t in zip(self.replicas, tags, strict=True))
            raise ValueError(f"{tag[0]}: replicas disagree on the collective ({per}); every "
                             f"replica must call the same collectives with the same shapes "
                             f"and dtypes, in the same order")
        return [v for _, v in slots]

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        me, dev = self.index(), self.devices[self.index()]
        values = self._deposit(x, ("psum/all_reduce", op, tuple(x.shape), x.dtype))
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

    def all_gather(self, x: torch.Tensor, tag: str = "all_gather") -> torch.Tensor:
        dev = self.devices[self.index()]
        values = self._deposit(x, (tag, None, tuple(x.shape), x.dtype))
        out = torch.stack([v.to(dev) for v in values])
        self._wait()
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dev = self.devices[self.index()]
        values = self._deposit(x, ("broadcast", src, tuple(x.shape), x.dtype))
        out = values[src].to(dev, copy=True)
        self._wait()
        return out

    def all_reduce_many(self, xs: list[torch.Tensor], op: ReduceOp) -> list[torch.Tensor]:
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

    def tracked_all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """All-reduce whose result is computed from every replica's tracked input (autograd
        then differentiates across replicas without any communication in backward)."""
        stacked = self.all_gather(x, f"psum/all_reduce({op}) [grad mode on]")
        if op == "sum":
            return stacked.sum(0, dtype=stacked.dtype)  # integers keep their dtype
        if op == "mean":
            return stacked.mean(0)
        return stacked.amax(0) if op == "max" else stacked.amin(0)

    def tracked_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather(x)


def _describe(tag: tuple) -> str:
    name, op, shape, dtype = tag
    return f"{name}{'' if op is None else f'({op})'} {dtype}{list(shape)}"


class _Pinned(Communicator):
    """A :class:`ThreadComm` seen as one fixed replica, from whichever thread calls it."""

    def __init__(self, comm: ThreadComm, replica: int) -> None:
        self.comm, self.size, self._replica = comm, comm.size, replica

    def index(self) -> int:
        return self.comm._position[self._replica]

    def pinned(self) -> Communicator:
        return self

    def _call(self, name: str, *args: Any) -> Any:
        previous = getattr(self.comm._local, "replica", None)
        self.comm.bind(self._replica)
        try:
            return getattr(self.comm, name)(*args)
        finally:
            self.comm.bind(previous)

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        return self._call("all_reduce", x, op)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("all_gather", x)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._call("broadcast", x, src)

    def tracked_all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        return self._call("tracked_all_reduce", x, op)

    def tracked_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("tracked_all_gather", x)


class ThreadsBackend(SpmdBackend, StackedPlacement):
    """One replica per listed device, each replica's work in its own thread.

    Outside its replica threads the backend keeps replicated values stacked on the first
    device (``StackedPlacement``).
    """

    name = "threads"
    ragged = True
    tape_collectives = True
    replicas_share_generator = True

    def __init__(self, devices: tuple[torch.device, ...], timeout: float, *,
                 repeats_ok: bool = False) -> None:
        cuda = [d for d in devices if d.type == "cuda"]
        if len(set(cuda)) < len(cuda) and not repeats_ok:
            raise ValueError(
                f"Mesh: devices lists a CUDA device more than once ({[str(d) for d in devices]});"
                f" replicas on one GPU would share its autograd thread and wait for each other "
                f"in backward. Use one replica per GPU, or fdp.Mesh(n, device='cuda') for "
                f"virtual replicas on one GPU"
            )
        self.size = len(devices)
        self.devices = devices
        self.timeout = timeout
        self.repeats_ok = repeats_ok  # a vmap mesh's general executor: all on one device
        self._comm = ThreadComm(devices, timeout)
        self._workers: ReplicaThreads | None = None
        self._lock = threading.Lock()  # one step at a time per mesh
        self._inside = threading.local()

    @classmethod
    def create(cls, n: object, devices: object, timeout: object) -> ThreadsBackend:
        """Validates ``fdp.Mesh(devices=..., timeout=...)``'s arguments and builds the backend."""
        if isinstance(devices, (str, torch.device, int)) or not isinstance(devices, Iterable):
            raise TypeError(f"Mesh: devices must be a list of devices, got {devices!r}; "
                            f"e.g. devices=['cuda:0', 'cuda:1'] or ['cpu'] * 3")
        devs = tuple(_check.device(d, "Mesh", f"devices[{i}]", default_cpu=False)
                     for i, d in enumerate(devices))
        if not devs:
            raise ValueError("Mesh: devices is empty; list at least one device")
        if n is not None and _check.integer(n, "Mesh", "n") != len(devs):
            raise ValueError(f"Mesh: n={n!r} but {len(devs)} devices were listed; drop n")
        return cls(devs, _check.positive_number(timeout, "Mesh", "timeout", " of seconds"))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its constructor call: the copy gets threads of its own."""
        return (_rebuild, (self.devices, self.timeout, self.repeats_ok))

    @property
    def local_replicas(self) -> tuple[int, ...]:
        return tuple(range(self.size))

    def comm(self) -> ThreadComm:
        return self._comm

    def active_comm(self, replicas: tuple[int, ...]) -> ThreadComm:
        return self._comm.subset(replicas)

    def run_replicas(self, fn: Callable[[int], Any]) -> list[Any]:
        if getattr(self._inside, "replica", None) is not None:
            raise RuntimeError(
                "a threads mesh cannot run a pmap or value_and_grad from inside one of its own "
                "replicas (nested use of the same mesh); nest over another mesh, or restructure "
                "the inner call as a vmap"
            )
        with self._lock:
            if self._workers is None:
                self._workers = ReplicaThreads(self.size)
            comm, state = self._comm, _ThreadState.capture()
            futures = [self._workers.submit(r, self._replica, fn, r, comm, state)
                       for r in range(self.size)]
            deadline = time.monotonic() + self.timeout
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result(timeout=max(deadline - time.monotonic(), 0)))
                except FutureTimeout:
                    raise self._timed_out(comm, futures) from None
            return self._results(outcomes, comm)

    def _timed_out(self, comm: ThreadComm, futures: list) -> TimeoutError:
        waiting = comm.waiting | {r for sub in comm._subsets.values()
                                  for r in (sub.replicas[i] for i in sub.waiting)}
        stuck = [r for r, f in enumerate(futures) if not f.done() and r not in waiting]
        comm.abort()  # replicas waiting in a collective raise ReplicaAborted and end
        assert self._workers is not None
        self._workers.retire(stuck, ReplicaAborted)  # the next step starts fresh threads
        self._workers = None
        self._comm = ThreadComm(self.devices, self.timeout)
        if not stuck:  # everyone else finished: the waiting ones made a call the others did not
            names = ", ".join(str(r) for r in sorted(waiting))
            return TimeoutError(
                f"replica(s) {names} waited {self.timeout} s in a collective that the other "
                f"replicas finished without: every replica must make the same collective calls"
            )
        names = ", ".join(f"{r} (device {self.devices[r]})" for r in stuck)
        return TimeoutError(
            f"replica{'s' if len(stuck) > 1 else ''} {names} did not finish within "
            f"{self.timeout} s "
            f"(fdp.Mesh(devices=..., timeout=...)); the other replicas were stopped"
        )

    def _replica(self, fn: Callable[[int], Any], r: int, comm: ThreadComm,
                 state: _ThreadState) -> tuple:
        comm.bind(r)
        self._inside.replica = r
        try:
            with state.entered(), _device_guard(self.devices[r]):
                return True, fn(r)
        except BaseException as e:  # re-raised by the caller; peers must not wait for us
            comm.abort()
            return False, e
        finally:
            comm.bind(None)
            self._inside.replica = None

    def _results(self, outcomes: list[tuple], comm: ThreadComm) -> list[Any]:
        failures = [(r, e) for r, (ok, e) in enumerate(outcomes) if not ok]
        if not failures:
            return [value for _, value in outcomes]
        comm.reset()
        # the first replica that failed on its own, not because a peer aborted the rendezvous
        r, error = next(((r, e) for r, e in failures if not isinstance(e, ReplicaAborted)),
                        failures[0])
        # forward-mode AD in the replicas fails in whichever replica the race hits first
        r, error = next(((r, b) for r, e in failures if (b := _explain.forward_ad(e))),
                        (r, error))
        add_note(error, f"raised in replica {r} of {self.size} (device {self.devices[r]}) "
                       f"of a threads mesh")
        raise error


class _ThreadState:
    """The caller's thread-local torch modes that replica threads must run under too: grad
    mode, inference mode and autocast (as ``nn.DataParallel``'s workers re-enter them)."""

    def __init__(self, grad: bool, inference: bool, autocast: list[tuple[str, torch.dtype]]):
        self.grad, self.inference, self.autocast = grad, inference, autocast

    @classmethod
    def capture(cls) -> _ThreadState:
        kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        autocast = [(k, torch.get_autocast_dtype(k)) for k in kinds
                    if torch.is_autocast_enabled(k)]
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(self.grad))
            if self.inference:
                stack.enter_context(torch.inference_mode())
            for kind, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype))
            yield


def _device_guard(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _rebuild(devices: tuple[torch.device, ...], timeout: float, repeats_ok: bool
             ) -> ThreadsBackend:
    return ThreadsBackend(devices, timeout, repeats_ok=repeats_ok)
