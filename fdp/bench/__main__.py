"""``python -m fdp.bench``: fdp's data-parallel step against plain PyTorch, one run, medians.

Measures (each ratio from candidates timed interleaved in the same run):
  eager    fdp DP step (vmap, N=8) / plain module forward+backward, per workload, and the
           same step on Mesh(8, executor="replay") (traced once, replayed)
  sweep    fdp DP step for N = 2..32 / plain, and its spread (max/min over N)
  compile  torch.compile'd fdp DP step (N=8) / plain eager (and compiled single-device, for scale);
           then how many times each compiles over 10 batch sizes (64..224, even and uneven)
  memory   peak memory of the DP step / the functional single-device step (subprocesses,
           larger batches so that activations dominate)
  jax      compiled fdp DP step (N=8) / jitted JAX value_and_grad and / jitted JAX vmap+pmean
           step, same MLP weights and batch (needs JAX: pip install "fdp[jax]"; else skipped)
  distributed  fdp data_parallel_step on Mesh.distributed / DDP (with and without the optimizer,
           and fdp with overlap), gloo, 2 ranks x 1 thread, MLP with 128 rows per rank
           (fresh processes per run, --runs runs)
  threads  fdp value_and_grad on the threads backend (["cpu"] * 2) / the vmap backend (Mesh(2))
  zero     Adam's optimizer state per rank and the step time with shard_optimizer_state=True
           / without, on gloo ranks (N = 2 and 4, 1 thread each, MLP 128 rows per rank)
  donate   the optimizer update as data_parallel_step runs it with donate="none", "auto" and
           "state" / torch.optim's in-place step (SGD with momentum, Adam; MLP params), and
           the whole step (Mesh(8), SGD) for each mode / module + torch.optim.SGD
  fallback the general executor (one thread per replica on the device) of Mesh(8): an LSTM,
           which vmap cannot run, and the MLP with executor="general" vs "vmap", each against
           the plain module fwd+bwd

With --device cuda (needs a CUDA build of torch and a GPU; without one it exits with status 2
and says why): eager, sweep, compile (mode="reduce-overhead": CUDA graphs), memory
(torch.cuda.max_memory_allocated) and distributed (a 1-process NCCL group) on the GPU, every
timed region bracketed by torch.cuda.synchronize() (see fdp/bench/_cuda.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import torch

from fdp.bench import (
    _cuda,
    _distributed,
    _donate,
    _fallback,
    _memory,
    _models,
    _recompile,
    _zero,
)
from fdp.bench._timing import time_interleaved

SECTIONS = ("eager", "sweep", "compile", "memory", "jax", "distributed", "threads",
            "fallback", "zero", "donate")


def _row(table: list, measure: str, name: str, stats: dict, base: dict | None) -> None:
    ratio = stats["median_ms"] / base["median_ms"] if base else None
    table.append({"measure": measure, "name": name, **stats, "ratio": ratio})


def bench_eager(workloads: list[str], rounds: int, n: int, table: list) -> None:
    for key in workloads:
        w = _models.WORKLOADS[key]()
        res = time_interleaved(
            {"plain": _models.plain_step(w), "dp": _models.dp_step(w, n),
             "replay": _models.dp_step(w, n, executor="replay")}, rounds
        )
        _row(table, "eager", f"{w.name}: plain module fwd+bwd", res["plain"], None)
        _row(table, "eager", f"{w.name}: fdp DP N={n}", res["dp"], res["plain"])
        _row(table, "eager", f"{w.name}: fdp DP N={n} replay", res["replay"],
             res["plain"])


def bench_sweep(workloads: list[str], rounds: int, sizes: list[int], table: list) -> None:
    for key in workloads:
        w = _models.WORKLOADS[key]()
        fns = {"plain": _models.plain_step(w)}
        fns.update({f"N={n}": _models.dp_step(w, n) for n in sizes})
        res = time_interleaved(fns, rounds)
        _row(table, "sweep", f"{w.name}: plain module fwd+bwd", res["plain"], None)
        for n in sizes:
            _row(table, "sweep", f"{w.name}: fdp DP N={n}", res[f"N={n}"], res["plain"])
        meds = [res[f"N={n}"]["median_ms"] for n in sizes]
        table.append({"measure": "sweep", "name": f"{w.name}: spread max/min over N",
                      "ratio": max(meds) / min(meds)})


def bench_compile(workloads: list[str], rounds: int, n: int, table: list) -> None:
    for key in workloads:
        w = _models.WORKLOADS[key]()
        fns = {"plain": _models.plain_step(w),
               "single": _models.functional_step(w, compiled=True),
               "dp": _models.dp_step(w, n, compiled=True)}
        fns["single"](), fns["dp"]()  # compile outside the timed rounds
        res = time_interleaved(fns, rounds)
        _row(table, "compile", f"{w.name}: plain module fwd+bwd", res["plain"], None)
        _row(table, "compile", f"{w.name}: compiled single-device func", res["single"],
             res["plain"])
        _row(table, "compile", f"{w.name}: compiled fdp DP N={n}", res["dp"], res["plain"])
        sizes = _recompile.SIZES
        for name, count in _recompile.compile_counts(w, n, sizes).items():
            table.append({"measure": "compile", "ratio": None, "compiles": count,
                          "name": f"{key}: {count} compiles/{len(sizes)} sizes, {name}",
                          "batch_sizes": list(sizes)})


def bench_memory(workloads: list[str], sizes: list[int], table: list) -> None:
    for key in workloads:
        batch = _models.MEMORY_BATCH[key]
        base = _memory.measure(key, "functional")
        table.append({"measure": "memory", "name": f"{key} B={batch}: functional single-device",
                      **base, "ratio": None})
        plain = _memory.measure(key, "plain")
        table.append({"measure": "memory", "name": f"{key} B={batch}: plain module fwd+bwd",
                      **plain, "ratio": plain["step_peak_mib"] / base["step_peak_mib"]})
        for n in sizes:
            dp = _memory.measure(key, "dp", n)
            table.append({"measure": "memory", "name": f"{key} B={batch}: fdp DP N={n}", **dp,
                          "ratio": dp["step_peak_mib"] / max(base["step_peak_mib"], 1e-9),
                          "total_ratio": dp["peak_rss_mib"] / base["peak_rss_mib"]})


def bench_jax(rounds: int, n: int, table: list) -> None:
    from fdp.bench import _jax  # imports JAX only when this section runs

    note = _jax.missing()
    if note is not None:
        table.append({"measure": "jax", "name": note, "ratio": None})
        return
    w, fns, diff = _jax.candidates(n)
    res = time_interleaved(fns, rounds)
    _row(table, "jax", f"{w.name}: JAX jit 1 device", res["jax_single"], None)
    _row(table, "jax", f"{w.name}: JAX jit vmap+pmean N={n}", res["jax_vmap"], res["jax_single"])
    _row(table, "jax", f"{w.name}: compiled fdp DP N={n}", res["fdp"], res["jax_single"])
    table.append({"measure": "jax", "name": f"{w.name}: fdp DP / JAX vmap+pmean",
                  "ratio": res["fdp"]["median_ms"] / res["jax_vmap"]["median_ms"]})
    table.append({"measure": "jax", "name": f"fdp vs JAX grads: max rel diff {diff:.1e}",
                  "ratio": None, "max_relative_grad_difference": diff})


def _print(table: list[dict[str, Any]]) -> None:
    print(f"{'measure':8} {'name':52} {'median':>9} {'min':>9} {'max':>9} {'ratio':>7}")
    for r in table:
        if "median_ms" in r:
            cols = f"{r['median_ms']:9.2f} {r['min_ms']:9.2f} {r['max_ms']:9.2f}"
        elif "peak_cuda_mib" in r:
            cols = f"{r['peak_cuda_mib']:8.0f}M {r['step_peak_mib']:8.1f}M {'':9}"
        elif "peak_rss_mib" in r:
            cols = f"{r['peak_rss_mib']:8.0f}M {r['step_peak_mib']:8.1f}M {'':9}"
        else:
            cols = " " * 29
        ratio = f"{r['ratio']:7.3f}" if r.get("ratio") is not None else ""
        print(f"{r['measure']:8} {r['name'][:52]:52} {cols} {ratio}")
    print("times in ms. memory rows: peak RSS of the process (--device cuda: peak allocated), "
          "then the step's peak above the "
          "pre-step RSS; their ratio is of the step peaks. ratio: vs the first row of the group")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fdp.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few rounds, small sweep (smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    p.add_argument("--workload", choices=sorted(_models.WORKLOADS), action="append")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--runs", type=int, default=None, help="distributed: runs (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU sections (%(default)s by default)")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 30)
    sizes = [2, 8] if args.quick else [2, 4, 8, 16, 32]
    workloads = args.workload or sorted(_models.WORKLOADS)
    table: list[dict[str, Any]] = []
    if args.device == "cuda":
        why = _cuda.missing()
        if why is not None:
            print(why, file=sys.stderr)
            return 2
        _cuda.run(args.only or list(_cuda.SECTIONS), rounds, args.quick, workloads, table)
        return _finish(table, args, rounds)
    sections = args.only or list(SECTIONS)
    if "eager" in sections:
        bench_eager(workloads, rounds, 8, table)
    if "sweep" in sections:
        bench_sweep(workloads, rounds, sizes, table)
    if "compile" in sections:
        bench_compile(workloads, rounds, 8, table)
    if "memory" in sections:
        bench_memory(workloads, [8] if args.quick else [2, 8, 32], table)
    if "jax" in sections:
        bench_jax(rounds, 8, table)
    if "distributed" in sections:
        _distributed.bench_distributed(max(rounds, 5), args.runs or (1 if args.quick else 3),
                                       table)
    if "threads" in sections:
        _distributed.bench_threads(rounds, table)
    if "fallback" in sections:
        _fallback.bench_fallback(rounds, 8, table)
    if "zero" in sections:
        _zero.bench_zero(max(rounds, 5), [2] if args.quick else [2, 4], table)
    if "donate" in sections:
        _donate.bench_donate(rounds, table)
    return _finish(table, args, rounds)


def _finish(table: list[dict[str, Any]], args: argparse.Namespace, rounds: int) -> int:
    _print(table)
    if args.json:
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
        meta = {"torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "rounds": rounds, "argv": sys.argv[1:],
                "jax": getattr(sys.modules.get("jax"), "__version__", None),
                "device": args.device, "gpu": gpu, "cuda": torch.version.cuda}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
