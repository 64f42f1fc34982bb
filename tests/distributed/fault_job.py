"""A torchrun job that goes wrong on purpose (``tests/distributed/test_faults.py`` launches it).

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/distributed/fault_job.py KIND DIR

Every rank writes its pid to ``DIR/rank<r>.pid`` once its mesh exists, then, by ``KIND``:

* ``stuck``: rank 1 never reaches a collective (``while True: time.sleep(1)``); rank 0 calls
  ``psum``, which raises ``PeerTimeout`` after the mesh's timeout (3 s). Rank 0 destroys the
  group in a ``finally:``, as scripts do, which must not wait for the stuck operation.
* ``mismatch``: the ranks pass ``psum`` tensors of different shapes: a ``ValueError`` on both.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fdp

MESH_TIMEOUT = 3.0


def main(kind: str, directory: Path) -> None:
    dist.init_process_group("gloo")
    try:
        mesh = fdp.Mesh.distributed(timeout=MESH_TIMEOUT)
        rank = dist.get_rank()
        (directory / f"rank{rank}.pid").write_text(str(os.getpid()))
        if kind == "stuck" and rank == 1:
            while True:
                time.sleep(1)
        width = 3 + rank if kind == "mismatch" else 3
        fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(torch.ones(1, width))
    finally:
        if kind == "stuck":
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
