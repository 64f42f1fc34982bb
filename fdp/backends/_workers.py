"""The threads backend's workers: one thread per replica, reused from step to step.

Replica ``r`` always runs on thread ``r`` (a thread pool hands jobs to whichever worker is
idle), so a replica's per-thread state (torch's and the math libraries' thread-local caches)
is the same in every step. The threads are daemons: one stuck in user code never blocks the
interpreter's exit, and they end when the backend that owns them is collected.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_Job = tuple[Future, Callable[..., Any], tuple[Any, ...]] | None


class ReplicaThreads:
    """``size`` worker threads; :meth:`submit` runs a job on a given replica's thread."""

    def __init__(self, size: int) -> None:
        self._queues: list[queue.SimpleQueue[_Job]] = [queue.SimpleQueue() for _ in range(size)]
        self._threads = [threading.Thread(target=_serve, args=(q,), daemon=True,
                                          name=f"fdp-replica-{r}")
                         for r, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()
        # the threads hold only their queue: when the owner is collected, they are told to end
        weakref.finalize(self, _stop, list(self._queues))

    def submit(self, replica: int, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queues[replica].put((future, fn, args))
        return future

    def retire(self, stuck: list[int], error: type[BaseException]) -> None:
        """Ends every thread after its current job; the ``stuck`` ones also get ``error``
        raised in them as soon as they run Python code again (a thread blocked inside a C
        call, e.g. a long ``time.sleep``, ends when that call returns)."""
        _stop(self._queues)
        for r in stuck:
            ident = self._threads[r].ident
            if ident is not None and self._threads[r].is_alive():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                           ctypes.py_object(error))


def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
    try:
        while True:
            job = jobs.get()
            if job is None:
                return
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)
            del job, future, fn, args  # no reference to the last job's values while idle
    except BaseException:  # retire()'s interrupt arrived between jobs: just end
        return


def _stop(queues: list[queue.SimpleQueue[_Job]]) -> None:
    for q in queues:
        q.put(None)
