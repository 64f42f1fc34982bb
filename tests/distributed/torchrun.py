"""Launching torchrun jobs from the tests, so that every rank imports this checkout's fdp."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def command(script: Path, *args: object, nprocs: int = 2, max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone`` (a c10d rendezvous on a free local port) running ``script``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nprocs), "--max-restarts", str(max_restarts), str(script), *map(str, args)]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Starts ``cmd`` in its own session, its stdout and stderr in ``log``."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *([path] if path else [])]),
           # torchrun's store, shared across restarts, would hand a restarted rank the
           # addresses of the attempt before (pytorch/pytorch#135712)
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """The job's exit code, or ``None`` if it ran past ``timeout`` (then it is killed)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        return None


def stop(proc: subprocess.Popen) -> None:
    """Kills what is left of the job's process group (torchrun, and ranks it left behind)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
