"""Run a function on k local processes joined in a ``torch.distributed`` group (127.0.0.1 only).

:func:`run` starts ``nprocs`` fresh processes, joins them in a process group over loopback,
calls ``fn(*args, **kwargs)`` in each and returns every rank's result. A rank that raises, dies
or stops answering makes :func:`run` raise in the caller (with that rank's exception and
traceback), and the whole run is bounded by ``timeout``: nothing is left hanging.

:class:`Pool` keeps ``nprocs`` worker processes with their group (and one subgroup for every
size ``1..nprocs``) alive between calls, so that many small jobs, such as the examples of a
property test, do not pay process start-up and rendezvous each time. Inside a job,
:func:`current_group` is the group to build the mesh on::

    def job(x):                       # at module level: jobs are pickled
        mesh = fdp.Mesh.distributed(fdp.launch.current_group())
        return fdp.gather(fdp.pmap(lambda v: v * 2, mesh)(fdp.scatter(x, mesh)), mesh)

    with fdp.launch.Pool(4) as pool:
        pool.run(job, 2, args=(x,))   # ranks 0 and 1 of the pool

Processes start from a fork server that imported torch once, so a start costs tens of
milliseconds after the first. ``fn`` and its arguments must be picklable (a module-level
function); results come back pickled. Warnings raised in a rank are re-issued in the caller.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from fdp import _check
from fdp._compat import add_note
from fdp.backends import _dist_exit

__all__ = ["Pool", "RankFailed", "current_group", "run"]

_GROUP: Any = None  # the group of the pool job running in this process
_GRACE_S = 1.0  # after a rank fails, how long the others get to report their own errors


class RankFailed(RuntimeError):
    """A rank exited without returning a result (it died, or was killed)."""


def current_group() -> Any:
    """The process group of the running :class:`Pool` job (``None``: the default group)."""
    return _GROUP


def run(fn: Callable[..., Any], nprocs: int, args: tuple = (), kwargs: dict | None = None, *,
        timeout: float = 300.0, backend: str = "gloo", threads: int = 1) -> list[Any]:
    """Runs ``fn(*args, **kwargs)`` on ``nprocs`` new local processes; returns each rank's result.

    Args:
        fn: a picklable function (defined at module level). Inside it, the default process
            group is initialized (rank ``0..nprocs-1``), as are ``RANK``, ``WORLD_SIZE``,
            ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
        nprocs: number of processes (ranks).
        args, kwargs: passed to ``fn`` (pickled).
        timeout: seconds the whole run may take, and the process group's timeout; past it
            every rank is terminated and ``TimeoutError`` raised.
        backend: the process group backend (``"gloo"``; ``"nccl"`` needs a GPU per rank).
        threads: ``torch.set_num_threads`` in each rank.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        RankFailed: a rank exited without a result.
        TimeoutError: the run took longer than ``timeout``.
        Exception: the first failing rank's own exception, its remote traceback in a note.

    Example:
        >>> fdp.launch.run(_rank_and_size, 2)
        [(0, 2), (1, 2)]
    """
    _check_args(nprocs, timeout, threads)
    payload = _dumps((fn, args, kwargs or {}), "run")
    store = _master_store(nprocs, timeout)
    ctx = _context()
    procs, conns = [], []
    try:
        for rank in range(nprocs):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_run_child, daemon=True, name=f"fdp-rank{rank}",
                            args=(rank, nprocs, store.port, backend, timeout, threads, payload,
                                  child))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        return _collect(procs, conns, list(range(nprocs)), time.monotonic() + timeout,
                        timeout, "fdp.launch.run")
    finally:
        _stop(procs)
        del store


class Pool:
    """``nprocs`` worker processes in one gloo group, reused by :meth:`run` calls.

    The workers start on the first :meth:`run` and stay until :meth:`close` (or the end of a
    ``with`` block). A job that fails in any way (an exception, a dead rank, a timeout) leaves
    the group in an unknown state, so the pool closes its workers and the next job starts
    fresh ones.

    Args:
        nprocs: the number of workers (the largest job size).
        timeout: seconds one job may take, and the process group's timeout.
        backend: the process group backend.
        threads: ``torch.set_num_threads`` in each worker.
    """

    def __init__(self, nprocs: int, *, timeout: float = 120.0, backend: str = "gloo",
                 threads: int = 1) -> None:
        _check_args(nprocs, timeout, threads)
        self.nprocs, self.timeout, self.backend, self.threads = nprocs, timeout, backend, threads
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._store: Any = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, fn: Callable[..., Any], nprocs: int | None = None, args: tuple = (),
            kwargs: dict | None = None) -> list[Any]:
        """Runs ``fn(*args, **kwargs)`` on ranks ``0..nprocs-1`` of the pool (default: all).

        Inside ``fn``, :func:`current_group` is a group of exactly those ranks.
        """
        n = self.nprocs if nprocs is None else nprocs
        if not _check.is_int(n) or not 1 <= n <= self.nprocs:
            raise ValueError(f"Pool.run: nprocs must be an int in 1..{self.nprocs} (the pool's "
                             f"size), got {nprocs!r}")
        payload = _dumps((fn, args, kwargs or {}, n), "Pool.run")
        if any(not p.is_alive() for p in self._procs):
            self.close()
        if not self._procs:
            self._start()
        try:
            for conn in self._conns[:n]:
                conn.send_bytes(payload)
            return _collect(self._procs[:n], self._conns[:n], list(range(n)),
                            time.monotonic() + self.timeout, self.timeout, "Pool.run")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stops the workers (they restart on the next :meth:`run`)."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"")  # asks a healthy worker to leave its loop
        _stop(self._procs, patience=2.0)
        self._procs, self._conns, self._store = [], [], None

    def _start(self) -> None:
        self._store = _master_store(self.nprocs, self.timeout)
        ctx = _context()
        for rank in range(self.nprocs):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_pool_worker, daemon=True, name=f"fdp-pool{rank}",
                            args=(rank, self.nprocs, self._store.port, self.backend,
                                  self.timeout, self.threads, child))
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        try:
            _collect(self._procs, self._conns, list(range(self.nprocs)),
                     time.monotonic() + self.timeout, self.timeout, "Pool start")
        except BaseException:
            self.close()
            raise


# --- the parent's side ---------------------------------------------------------------------


def _check_args(nprocs: Any, timeout: Any, threads: Any) -> None:
    if not _check.is_int(nprocs) or nprocs < 1:
        raise ValueError(f"fdp.launch: nprocs must be an int >= 1, got {nprocs!r}")
    if not _check.is_number(timeout) or timeout <= 0:
        raise ValueError(f"fdp.launch: timeout must be a positive number of seconds, got "
                         f"{timeout!r}")
    if not _check.is_int(threads) or threads < 1:
        raise ValueError(f"fdp.launch: threads must be an int >= 1, got {threads!r}")


def _dumps(obj: Any, fn: str) -> bytes:
    try:
        return pickle.dumps(obj)
    except Exception as e:
        raise TypeError(f"{fn}: the function and its arguments must be picklable (define the "
                        f"function at module level, not as a lambda or closure): {e}") from e


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "fdp"])
    return ctx


def _master_store(nprocs: int, timeout: float) -> Any:
    """A TCPStore on a free loopback port, owned by the caller (no port race)."""
    return dist.TCPStore("127.0.0.1", 0, nprocs + 1, True,
                         timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)


def _collect(procs: list, conns: list, ranks: list[int], deadline: float, timeout: float,
             fn: str) -> list[Any]:
    """Each rank's result in rank order, or the first failure raised (with the others' noted)."""
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    pending = dict(zip(ranks, zip(procs, conns, strict=True), strict=True))
    stop_at = deadline
    while pending and time.monotonic() < stop_at:
        handles = [c for _, c in pending.values()] + [p.sentinel for p, _ in pending.values()]
        ready = wait(handles, timeout=max(0.0, stop_at - time.monotonic()))
        for rank, (p, conn) in list(pending.items()):
            if conn not in ready and p.sentinel not in ready:
                continue
            outcome = _receive(conn, p, rank, len(ranks))
            if outcome is None:
                continue  # the process is exiting; its message (or exit code) comes next
            del pending[rank]
            ok, value = outcome
            if ok:
                results[rank] = value
            else:
                errors[rank] = value
                stop_at = min(stop_at, time.monotonic() + _GRACE_S)
    if errors:
        from fdp.backends._dist_comm import PeerFailure

        # the cause: the first to arrive that did not fail because a peer did
        first = next((r for r, e in errors.items() if not isinstance(e, PeerFailure)),
                     next(iter(errors)))
        error = errors[first]
        others = [f"rank {r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  for r, e in sorted(errors.items()) if r != first]
        if others:
            add_note(error, "other ranks failed too: " + "; ".join(others))
        raise error
    if pending:
        raise TimeoutError(f"{fn}: rank(s) {sorted(pending)} did not finish within {timeout:g} "
                           f"s; every rank was terminated")
    return [results[r] for r in ranks]


def _receive(conn: Connection, p: Any, rank: int, n: int) -> tuple[bool, Any] | None:
    try:
        if conn.poll():
            ok, value, caught = pickle.loads(conn.recv_bytes())
            _reissue(caught)
            if not ok:
                value = _rebuild_error(value, rank, n)
            return ok, value
    except (EOFError, OSError):
        pass
    p.join(0.2)
    if p.exitcode is None:
        return None
    how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
    return False, RankFailed(f"rank {rank} of {n} exited with {how} before returning a result")


def _rebuild_error(packed: tuple, rank: int, n: int) -> BaseException:
    blob, text, tb = packed
    try:
        error = pickle.loads(blob) if blob is not None else RuntimeError(text)
    except Exception:
        error = RuntimeError(text)
    add_note(error, f"raised in rank {rank} of {n} (fdp.launch); the rank's traceback:\n{tb}")
    return error


def _reissue(caught: list[tuple]) -> None:
    for category, message, filename, lineno in caught:
        warnings.warn_explicit(message, category, filename, lineno)


def _stop(procs: list, patience: float = 0.5) -> None:
    end = time.monotonic() + patience
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


# --- the ranks' side -----------------------------------------------------------------------


def _init(rank: int, world: int, port: int, backend: str, timeout: float,
          threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    if "nccl" in backend and torch.cuda.is_available():  # one GPU per rank, as torchrun
        torch.cuda.set_device(rank % torch.cuda.device_count())
    delta = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, world + 1, False, timeout=delta)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=delta)


def _call(payload: bytes, init: Callable[[], Any] | None = None) -> bytes:
    """Runs one job; returns the pickled ``(ok, result or packed error, warnings)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if init is not None:
                init()
            fn, args, kwargs = pickle.loads(payload)[:3]
            message: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as e:  # reported to the parent, which re-raises it
            message = (False, _pack_error(e))
    found = [(w.category, str(w.message), w.filename, w.lineno) for w in caught]
    try:
        return pickle.dumps((*message, found))
    except Exception as e:
        error = TypeError(f"fdp.launch: the function's result cannot be pickled: {e}")
        return pickle.dumps((False, _pack_error(error), found))


def _pack_error(e: BaseException) -> tuple:
    tb = "".join(traceback.format_exception(e))
    try:
        packed = pickle.dumps(e)
        pickle.loads(packed)  # what cannot be unpickled travels as text
        blob: bytes | None = packed
    except Exception:
        blob = None
    return blob, f"{type(e).__name__}: {e}", tb


def _finish() -> None:
    if dist.is_initialized() and _dist_exit.failed() is None:  # else the teardown would hang
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _run_child(rank: int, world: int, port: int, backend: str, timeout: float, threads: int,
               payload: bytes, conn: Connection) -> None:
    message = _call(payload, lambda: _init(rank, world, port, backend, timeout, threads))
    conn.send_bytes(message)
    conn.close()
    _finish()


def _pool_worker(rank: int, world: int, port: int, backend: str, timeout: float,
                 threads: int, conn: Connection) -> None:
    global _GROUP
    groups: dict[int, Any] = {}

    def init() -> None:
        _init(rank, world, port, backend, timeout, threads)
        for size in range(1, world):  # every rank takes part in creating every group
            groups[size] = dist.new_group(list(range(size)))
        groups[world] = None

    conn.send_bytes(_call(pickle.dumps((_ready, (), {})), init))
    while True:
        payload = conn.recv_bytes()
        if not payload:
            break
        size = pickle.loads(payload)[3]
        _GROUP = groups[size]
        try:
            conn.send_bytes(_call(payload))
        finally:
            _GROUP = None
    _finish()


def _ready() -> bool:
    return True


def _rank_and_size() -> tuple[int, int]:
    """Used by the docstring example of :func:`run`."""
    return dist.get_rank(), dist.get_world_size()
