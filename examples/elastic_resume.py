"""Elastic training: a rank is lost, torchrun restarts the job, training resumes bit for bit.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 2 \\
        --max-restarts 1 examples/elastic_resume.py --checkpoint /tmp/fdp-elastic --kill-at 12

Every ``--every`` steps each rank calls ``fdp.save_checkpoint(path, state, mesh=mesh)``: process 0
writes the whole ``fdp.TrainState`` (atomically: a rank killed mid-save leaves the previous
checkpoint) and the others wait until it is in place. With ``--kill-at`` rank 1
kills itself (SIGKILL) at that step, in the first attempt only (``TORCHELASTIC_RESTART_COUNT``
is 0). The other rank's next collective raises ``PeerFailure`` and its process exits with code
1; torchrun restarts every rank (``--max-restarts``), and each one loads the last checkpoint
and carries on. Everything that varies from step to step comes from the state: the batch order
from the generator whose state is ``state.rng``, the dropout masks from ``fold_in(key, step)``
(``data_parallel_step(key=...)``); so the resumed run ends with the same parameters, bit for
bit, as one that was never interrupted (``tests/distributed/test_elastic.py`` checks it).
``--out`` saves the final params (rank 0) with ``torch.save``.

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default torchrun's agent keeps one store for every
attempt, and a restarted rank may read the previous attempt's addresses there and fail to
connect (pytorch/pytorch#135712); with it, each attempt gets a fresh store.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fdp
import fdp.nn

ROWS, BATCH = 256, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="directory of the checkpoint")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every k steps")
    parser.add_argument("--kill-at", type=int, default=None,
                        help="rank 1 kills itself at this step (first attempt only)")
    parser.add_argument("--out", default=None, help="rank 0 saves the final params here")
    parser.add_argument("--timeout", type=float, default=60.0, help="the mesh's timeout (s)")
    args = parser.parse_args()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        print("warning: a restart may fail to connect: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "for torchrun, which then gives each attempt a fresh store (pytorch/pytorch#135712)",
              file=sys.stderr, flush=True)
    dist.init_process_group("gloo")
    params = train(args)
    if args.out is not None and dist.get_rank() == 0:
        torch.save(params, args.out)
    dist.destroy_process_group()  # only after success: a failed group exits on its own


def train(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    mesh = fdp.Mesh.distributed(timeout=args.timeout)
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    data = torch.Generator().manual_seed(1234)  # the same dataset on every rank
    x = torch.randn(ROWS, 8, generator=data)
    y = x[:, :1].sin() + 0.1 * torch.randn(ROWS, 1, generator=data)
    torch.manual_seed(0)  # the same initial params on every rank
    model = fdp.functionalize(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), fdp.nn.Dropout(0.1),
                                            nn.Linear(32, 1)))

    def loss_fn(params: dict, batch: dict) -> torch.Tensor:
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean()

    optimizer = fdp.optim.adam(1e-2)
    step = fdp.data_parallel_step(loss_fn, optimizer, mesh, key=fdp.random.key(7))
    state = fdp.TrainState.create(model.params, optimizer, seed=42)
    if (Path(args.checkpoint) / "state.pt").exists():
        state = fdp.load_checkpoint(args.checkpoint, like=state)
        if rank == 0:
            print(f"attempt {attempt}: resumed from the checkpoint at step {int(state.step)}",
                  flush=True)
    order = torch.Generator()
    while int(state.step) < args.steps:
        if args.kill_at == int(state.step) and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a lost machine: no clean-up at all
        order.set_state(state.rng)  # the batch order comes from the state, so it resumes
        idx = torch.randperm(ROWS, generator=order)[:BATCH]
        state, metrics = step(state._replace(rng=order.get_state()), {"x": x[idx], "y": y[idx]})
        if int(state.step) % args.every == 0:  # every rank calls it; process 0 writes
            fdp.save_checkpoint(args.checkpoint, state, mesh=mesh)
            if rank == 0:
                print(f"step {int(state.step)}: loss {metrics['loss'].item():.5f}, saved",
                      flush=True)
    return state.params


if __name__ == "__main__":
    main()
