"""How a process with a distributed mesh exits: promptly, with the cause on stderr, no abort.

Two of torch's exit paths go wrong with gloo (torch 2.13), and :func:`install` (called by
``fdp.Mesh.distributed``) registers one ``atexit`` handler, :func:`_at_exit`, for both:

* **After a failed collective** (:class:`~fdp.backends._dist_comm.PeerFailure`, or its
  subclass ``PeerTimeout``) the process group still holds the operation that never completed:
  gloo's worker thread waits for the missing peer for the group's own timeout (30 minutes by
  default), and destroying the group, by ``destroy_process_group`` or at the interpreter's exit,
  joins that thread. ``ProcessGroup.abort()`` and ``shutdown()`` do not interrupt it, so a
  process whose peer is stuck would never exit, and torchrun would never end the job.
  :func:`record` (called by ``DistComm`` when it raises) keeps the failed group referenced, so
  that a ``destroy_process_group()`` in the user's ``finally:`` returns instead of waiting; at
  exit, the handler writes the cause to stderr, flushes the streams and logging, and leaves with
  ``os._exit(1)``, skipping the teardown that would wait. torchrun then sees a failed rank and
  stops the others, stuck ones included (SIGTERM, then SIGKILL), or restarts the job.
* **A healthy group that was not destroyed** (the script ended, or raised, without
  ``destroy_process_group()``) is torn down during the interpreter's finalization or after it,
  where gloo's threads may touch a dying interpreter: the process sometimes aborts ("terminate
  called without an active exception", exit code 134; pytorch/pytorch#190489). The handler
  destroys it while the interpreter is still whole, so the exit code is the script's own.

An uncaught exception's traceback is printed before either (``sys.excepthook`` runs before
``atexit`` handlers).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from typing import Any

import torch.distributed as dist

__all__ = ["EXIT_CODE", "failed", "install", "record"]

EXIT_CODE = 1  # Python's own code for an uncaught exception

_cause: str | None = None  # the first failure of this process, in a few words
_kept: list[Any] = []  # failed process groups, never destroyed (that would wait)
_installed = False


def install() -> None:
    """Registers the exit handler (once per process)."""
    global _installed
    if not _installed:
        atexit.register(_at_exit)
        _installed = True


def record(error: BaseException, group: Any) -> None:
    """Marks ``group`` (``None``: the default group) as failed by ``error``; the first error
    recorded in the process is the cause reported at exit."""
    global _cause
    for pg in (group, dist.group.WORLD):
        if pg is not None and all(pg is not k for k in _kept):
            _kept.append(pg)
    if _cause is None:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _cause = f"{type(error).__name__}: {text.split('; ')[0].split('. ')[0]}"
    install()


def failed() -> str | None:
    """The cause, if a collective of this process failed; ``None`` while its groups are sound."""
    return _cause


def _at_exit() -> None:
    if _cause is not None:
        _exit_now()
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _exit_now() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(
            f"fdp: exiting with code {EXIT_CODE} after a failed collective ({_cause}), without "
            f"destroying the process group, which would wait for the operation that never "
            f"completed. Restart the job (torchrun --max-restarts) and resume from the last "
            f"checkpoint.\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        logging.shutdown()
    os._exit(EXIT_CODE)
