"""``zero``: sharded optimizer state (``shard_optimizer_state=True``) on gloo processes.

N gloo ranks on 127.0.0.1 (``fdp.launch``), one torch thread each, the MLP 784-512-512-10 with
128 rows per rank and Adam. Every rank measures the bytes of the optimizer state it holds and
the step time of ``fdp.data_parallel_step`` without and with ``shard_optimizer_state=True``
(interleaved rounds after a barrier, in the same shuffled order on every rank); rank 0's times
are reported, the state bytes of the rank that holds the most.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import fdp
import fdp.launch
from fdp._compat import pytree
from fdp.bench import _models
from fdp.bench._distributed import time_in_ranks

ROWS_PER_RANK = 128


def _bytes(tree: Any) -> int:
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(tree)
               if isinstance(x, torch.Tensor))


def _measure(rounds: int, warmup: int = 3) -> dict[str, Any]:
    """Runs in every rank: state bytes and per-round step times (ms) of both candidates."""
    n = dist.get_world_size()
    w = _models.mlp(ROWS_PER_RANK * n)
    loss_fn, params = w.loss_fn(), w.params()
    mesh = fdp.Mesh.distributed()
    opt = fdp.optim.adam(1e-3)
    fns: dict[str, Callable[[], None]] = {}
    held: dict[str, int] = {}
    for name, shard in (("unsharded", False), ("sharded", True)):
        step = fdp.data_parallel_step(loss_fn, opt, mesh, shard_optimizer_state=shard)
        box = [fdp.TrainState.create(params, opt, mesh=mesh, shard_optimizer_state=shard)]
        held[name] = _bytes(box[0].opt_state)

        def run(step: Callable = step, box: list = box) -> None:
            box[0], _ = step(box[0], w.batch)

        fns[name] = run
    samples = time_in_ranks(fns, rounds, warmup)
    return {"bytes": held, "samples": samples,
            "params_bytes": _bytes(params)}


def bench_zero(rounds: int, sizes: list[int], table: list) -> None:
    for n in sizes:
        results = fdp.launch.run(_measure, n, args=(rounds,), timeout=600, threads=1)
        label = f"gloo N={n}, mlp adam"
        full = max(r["bytes"]["unsharded"] for r in results)
        mine = max(r["bytes"]["sharded"] for r in results)
        times = {k: _stats(v) for k, v in results[0]["samples"].items()}
        table.append({"measure": "zero", "name": f"{label}: unsharded step", **times["unsharded"],
                      "ratio": None, "opt_state_mib_per_rank": full / 2**20})
        table.append({"measure": "zero", "name": f"{label}: sharded step", **times["sharded"],
                      "ratio": times["sharded"]["median_ms"] / times["unsharded"]["median_ms"],
                      "opt_state_mib_per_rank": mine / 2**20})
        table.append({"measure": "zero", "name": f"{label}: opt state/rank "
                      f"{full / 2**20:.2f} -> {mine / 2**20:.2f} MiB", "ratio": mine / full,
                      "opt_state_bytes_unsharded": full, "opt_state_bytes_sharded": mine,
                      "params_bytes": results[0]["params_bytes"]})


def _stats(v: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}
