"""``python -m fdp.bench --device cuda``: the benchmark's sections on one GPU.

* every timed region is bracketed by ``torch.cuda.synchronize()``, so a time covers the
  kernels and not only their launch;
* ``eager``/``sweep``: fdp's vmap DP step (``fdp.Mesh(n, device="cuda")``) against the plain
  module forward + backward on the same GPU;
* ``compile``: the DP step and the single-device ``torch.func`` step compiled with
  ``mode="reduce-overhead"`` (CUDA graphs), against the plain eager step;
* ``memory``: the step's peak of ``torch.cuda.max_memory_allocated`` (after
  ``reset_peak_memory_stats``) above what was allocated before it, DP against functional;
  allocations are exact on CUDA, so it runs in this process;
* ``distributed``: a 1-process NCCL group (``init_process_group("nccl")`` on a free port):
  ``fdp.data_parallel_step`` and ``fdp.value_and_grad`` on ``fdp.Mesh.distributed()`` against
  DDP's step and forward + backward; it measures fdp's per-call overhead around NCCL, not
  communication (one rank).

Each function takes the device and the process-group backend, so that the tests can run the
same code on the CPU with gloo.
"""

from __future__ import annotations

import datetime
import gc
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import fdp
from fdp.bench import _models
from fdp.bench._timing import time_interleaved

SECTIONS = ("eager", "sweep", "compile", "memory", "distributed")
COMPILE_MODE = "reduce-overhead"  # CUDA graphs: replays without per-kernel launch overhead


def missing() -> str | None:
    """Why ``--device cuda`` cannot run here, or ``None`` when it can."""
    if torch.cuda.is_available():
        return None
    why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
           else f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no "
                f"CUDA device")
    return (f"python -m fdp.bench --device cuda: CUDA is not available: {why}. Run it on a "
            f"machine with an NVIDIA GPU and a CUDA build of torch (python dev.py setup with "
            f"FDP_TORCH_INDEX_URL set to PyTorch's index for your CUDA version), or leave out "
            f"--device cuda for the CPU benchmark")


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _row(table: list, measure: str, name: str, stats: dict, base: dict | None) -> None:
    ratio = stats["median_ms"] / base["median_ms"] if base else None
    table.append({"measure": measure, "name": name, **stats, "ratio": ratio})


def bench_steps(workloads: list[str], rounds: int, sizes: list[int], table: list,
                device: torch.device, measure: str = "eager") -> None:
    """The vmap DP step for each N in ``sizes`` against the plain step, on ``device``."""
    for key in workloads:
        w = _models.WORKLOADS[key]().to(device)
        fns = {"plain": _models.plain_step(w)}
        fns.update({f"N={n}": _models.dp_step(w, n) for n in sizes})
        res = time_interleaved(fns, rounds, sync=_sync(device))
        _row(table, measure, f"{w.name} {device.type}: plain module fwd+bwd", res["plain"], None)
        for n in sizes:
            _row(table, measure, f"{w.name} {device.type}: fdp DP N={n}", res[f"N={n}"],
                 res["plain"])


def bench_compile(workloads: list[str], rounds: int, n: int, table: list,
                  device: torch.device, mode: str | None = COMPILE_MODE) -> None:
    for key in workloads:
        w = _models.WORKLOADS[key]().to(device)
        fns = {"plain": _models.plain_step(w),
               "single": _models.functional_step(w, compiled=True, mode=mode),
               "dp": _models.dp_step(w, n, compiled=True, mode=mode)}
        for _ in range(3):  # compile, then record the graphs, outside the timed rounds
            fns["single"](), fns["dp"]()
        res = time_interleaved(fns, rounds, sync=_sync(device))
        how = f"compiled ({mode or 'default'})"
        _row(table, "compile", f"{w.name} {device.type}: plain module fwd+bwd", res["plain"],
             None)
        _row(table, "compile", f"{w.name} {device.type}: {how} single-device func",
             res["single"], res["plain"])
        _row(table, "compile", f"{w.name} {device.type}: {how} fdp DP N={n}", res["dp"],
             res["plain"])


def _peak_mib(workload: str, kind: str, n: int, device: torch.device) -> dict[str, float]:
    """The step's peak CUDA allocation above the allocation before it (after a warm-up)."""
    def make(batch: int) -> Callable[[], Any]:
        w = _models.WORKLOADS[workload](batch).to(device)
        if kind == "plain":
            return _models.plain_step(w)
        return _models.functional_step(w) if kind == "functional" else _models.dp_step(w, n)

    make(2)()  # lazy initialisation (cuBLAS handles, ...) does not count
    step = make(_models.MEMORY_BATCH[workload])
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_cuda_mib": peak / 2**20, "step_peak_mib": (peak - before) / 2**20}


def bench_memory(workloads: list[str], sizes: list[int], table: list,
                 device: torch.device) -> None:
    for key in workloads:
        batch = _models.MEMORY_BATCH[key]
        base = _peak_mib(key, "functional", 1, device)
        table.append({"measure": "memory", "name": f"{key} B={batch} cuda: functional",
                      **base, "ratio": None})
        for kind, n in [("plain", 1), *(("dp", n) for n in sizes)]:
            got = _peak_mib(key, kind, n, device)
            name = "plain module fwd+bwd" if kind == "plain" else f"fdp DP N={n}"
            table.append({"measure": "memory", "name": f"{key} B={batch} cuda: {name}", **got,
                          "ratio": got["step_peak_mib"] / max(base["step_peak_mib"], 1e-9)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_distributed(rounds: int, table: list, device: torch.device,
                      backend: str = "nccl") -> None:
    """fdp on a 1-process group against DDP, in this process (the group is destroyed after)."""
    if dist.is_initialized():
        raise RuntimeError("fdp.bench --device cuda: a process group is already initialized; "
                           "run the benchmark in a fresh process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        _distributed_rows(rounds, table, device, backend)
    finally:
        dist.destroy_process_group()


def _distributed_rows(rounds: int, table: list, device: torch.device, backend: str) -> None:
    w = _models.mlp(256).to(device)
    loss_fn, params, batch = w.loss_fn(), w.params(), w.batch
    mesh = fdp.Mesh.distributed(device=device)
    step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.01), mesh)
    state = [fdp.TrainState.create(params, fdp.optim.sgd(0.01))]
    vg = fdp.value_and_grad(loss_fn, mesh)
    module = nn.parallel.DistributedDataParallel(
        w.module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)

    def fdp_step() -> None:
        state[0], _ = step(state[0], batch)

    def ddp_grads() -> None:
        module.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(batch["x"]), batch["y"]).backward()

    def ddp_step() -> None:
        ddp_grads()
        optimizer.step()

    fns = {"DDP": ddp_step, "fdp": fdp_step, "DDP fwd+bwd": ddp_grads,
           "fdp value_and_grad": lambda: vg(params, batch)}
    res = time_interleaved(fns, rounds, sync=_sync(device))
    label = f"{backend} 1 rank, {w.name} {device.type}"
    for name, base in (("DDP", None), ("fdp", "DDP"), ("DDP fwd+bwd", None),
                       ("fdp value_and_grad", "DDP fwd+bwd")):
        _row(table, "distributed", f"{label}: {name}", res[name],
             res[base] if base else None)


def run(sections: list[str], rounds: int, quick: bool, workloads: list[str],
        table: list) -> None:
    """The sections of ``--device cuda`` (the others are listed as not measured)."""
    device = torch.device("cuda", torch.cuda.current_device())
    sizes = [2, 8] if quick else [2, 4, 8, 16, 32]
    for section in sections:
        if section == "eager":
            bench_steps(workloads, rounds, [8], table, device)
        elif section == "sweep":
            bench_steps(workloads, rounds, sizes, table, device, measure="sweep")
        elif section == "compile":
            bench_compile(workloads, rounds, 8, table, device)
        elif section == "memory":
            bench_memory(workloads, [8] if quick else [2, 8, 32], table, device)
        elif section == "distributed":
            bench_distributed(max(rounds, 5), table, device)
        else:
            table.append({"measure": section, "name": f"not measured with --device cuda "
                          f"(CUDA sections: {', '.join(SECTIONS)})", "ratio": None})
