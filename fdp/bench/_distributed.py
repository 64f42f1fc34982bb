"""Benchmarks of the backends that run replicas concurrently.

``distributed``: 2 gloo ranks on 127.0.0.1 (``fdp.launch``), one torch thread each, MLP
784-512-512-10 with 128 rows per rank. In every rank and round, each candidate runs once after a
barrier, in a shuffled order that is the same on every rank:

* ``fdp``: ``fdp.data_parallel_step`` (SGD, the default ``donate="auto"``: the update writes
  into recycled buffers) on ``fdp.Mesh.distributed()`` (on CPU, the buckets summed after
  backward, through shared memory: the ranks share this host), ``fdp donate=none`` (fresh
  tensors every step), ``fdp donate=state`` (in place into the donated state), ``fdp overlap``
  (``overlap=True``: buckets launched during backward, the first one at most 1 MB, as DDP) and
  ``fdp gloo`` (``shared_memory=False``: the buckets through gloo's sockets, as DDP's);
* ``DDP``: ``torch.nn.parallel.DistributedDataParallel`` on the same model and rows, with
  ``torch.optim.SGD`` (``zero_grad``, forward, loss, backward, step);
* gradients only: ``fdp value_and_grad`` against ``DDP fwd+bwd`` (no optimizer), which
  separates the gradient path from the optimizer (fdp's is functional, torch's in place).

Rank 0's times are reported; each run starts fresh processes.

``threads``: ``fdp.value_and_grad`` on ``fdp.Mesh(devices=["cpu"] * 2)`` (a thread per
replica) against ``fdp.Mesh(2)`` (vmap), same MLP and batch, in this process.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import fdp
import fdp.launch
from fdp._donation import Donate
from fdp.bench import _models
from fdp.bench._timing import time_interleaved

ROWS_PER_RANK = 128
RANKS = 2


def _candidates(rows: int) -> dict[str, Callable[[], Any]]:
    """The step functions of this rank (same model, same rows, same optimizer)."""
    w = _models.mlp(rows * RANKS)  # seeded: the same global batch and weights on every rank
    rank = dist.get_rank()
    mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in w.batch.items()}
    loss_fn, params = w.loss_fn(), w.params()
    fns: dict[str, Callable[[], Any]] = {}
    runs: tuple[tuple[str, bool | None, Donate, bool | None], ...] = (
        ("fdp", None, "auto", None), ("fdp overlap", True, "auto", None),
        ("fdp donate=none", None, "none", None), ("fdp donate=state", None, "state", None),
        ("fdp gloo", None, "auto", False))
    for name, overlap, donate, shared in runs:
        mesh = fdp.Mesh.distributed(overlap=overlap, shared_memory=shared)
        step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.01), mesh, donate=donate)
        fns[name] = _stepper(step, fdp.TrainState.create(params, fdp.optim.sgd(0.01)),
                             w.batch)
    module = nn.parallel.DistributedDataParallel(w.module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)

    def ddp() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(mine["x"]), mine["y"]).backward()
        optimizer.step()

    def ddp_grads() -> None:
        module.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(mine["x"]), mine["y"]).backward()

    vg = fdp.value_and_grad(loss_fn, fdp.Mesh.distributed())
    vg_gloo = fdp.value_and_grad(loss_fn, fdp.Mesh.distributed(shared_memory=False))
    fns["DDP"], fns["DDP fwd+bwd"] = ddp, ddp_grads
    fns["fdp value_and_grad"] = lambda: vg(params, w.batch)
    fns["fdp value_and_grad gloo"] = lambda: vg_gloo(params, w.batch)
    return fns


def _stepper(step: Callable, state: fdp.TrainState, batch: dict) -> Callable[[], None]:
    box = [state]

    def run() -> None:
        box[0], _ = step(box[0], batch)

    return run


def _measure(rounds: int, warmup: int = 5) -> dict[str, list[float]]:
    """Runs in every rank: the per-round times (ms) of each candidate."""
    return time_in_ranks(_candidates(ROWS_PER_RANK), rounds, warmup)


def time_in_ranks(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int
                  ) -> dict[str, list[float]]:
    """Runs in every rank: each function's per-round times (ms), interleaved in a shuffled
    order that every rank shares, with a barrier before each timed call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, shuffle = list(fns), random.Random(0).shuffle  # the same order on every rank
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def bench_distributed(rounds: int, runs: int, table: list) -> None:
    ratios: list[float] = []
    grad_ratios: list[float] = []
    for run in range(runs):
        samples = fdp.launch.run(_measure, RANKS, args=(rounds,), timeout=600, threads=1)[0]
        stats = {k: _stats(v) for k, v in samples.items()}
        base = stats["DDP"]
        label = f"gloo {RANKS}x1 thread, mlp {ROWS_PER_RANK}/rank, run {run + 1}"
        table.append({"measure": "distributed", "name": f"{label}: DDP", **base,
                      "ratio": None})
        for name, ref in (("fdp", base), ("fdp donate=none", base), ("fdp donate=state", base),
                          ("fdp overlap", base), ("fdp gloo", base), ("DDP fwd+bwd", None),
                          ("fdp value_and_grad", stats["DDP fwd+bwd"]),
                          ("fdp value_and_grad gloo", stats["DDP fwd+bwd"])):
            table.append({"measure": "distributed", "name": f"{label}: {name}", **stats[name],
                          "ratio": stats[name]["median_ms"] / ref["median_ms"] if ref else None})
        ratios.append(stats["fdp"]["median_ms"] / base["median_ms"])
        grad_ratios.append(stats["fdp value_and_grad"]["median_ms"]
                           / stats["DDP fwd+bwd"]["median_ms"])
    for what, values in (("fdp step / DDP step", ratios),
                         ("fdp value_and_grad / DDP fwd+bwd", grad_ratios)):
        table.append({"measure": "distributed", "name": f"{what}, median of {runs} runs",
                      "ratio": statistics.median(values), "runs": values})


def _stats(v: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}


def bench_threads(rounds: int, table: list) -> None:
    w = _models.mlp(256)
    loss_fn, params = w.loss_fn(), w.params()
    meshes = {"vmap": fdp.Mesh(2), "threads": fdp.Mesh(devices=["cpu"] * 2)}
    fns = {k: _value_and_grad(fdp.value_and_grad(loss_fn, m), params, w.batch)
           for k, m in meshes.items()}
    res = time_interleaved(fns, rounds)
    table.append({"measure": "threads", "name": f"{w.name}: fdp vmap Mesh(2)", **res["vmap"],
                  "ratio": None})
    table.append({"measure": "threads", "name": f"{w.name}: fdp threads ['cpu']*2",
                  **res["threads"], "ratio": res["threads"]["median_ms"]
                  / res["vmap"]["median_ms"]})


def _value_and_grad(fn: Callable, params: dict, batch: dict) -> Callable[[], Any]:
    return lambda: fn(params, batch)
