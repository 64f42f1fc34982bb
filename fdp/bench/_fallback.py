"""The general executor's cost: a model vmap cannot run (an LSTM), and one it can (the MLP) run
on the general executor on purpose, each against the plain module step."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fdp
from fdp.backends import Executor
from fdp.bench import _models
from fdp.bench._timing import time_interleaved


class _Tagger(nn.Module):
    """A 2-layer LSTM sequence classifier (what vmap has no batching rule for)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm(batch_size: int = 64) -> _models.Workload:
    torch.manual_seed(0)
    batch = {"x": torch.randn(batch_size, 20, 32), "y": torch.randint(0, 10, (batch_size,))}
    return _models.Workload(f"lstm 2x64 T=20 B={batch_size}", _Tagger(), batch)


def _dp(w: _models.Workload, mesh: fdp.Mesh) -> Callable[[], Any]:
    vg = fdp.value_and_grad(w.loss_fn(), mesh)
    params, batch = w.params(), w.batch
    return lambda: vg(params, batch)


def bench_fallback(rounds: int, n: int, table: list[dict[str, Any]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fdp.FallbackWarning)
        runs: list[tuple[_models.Workload, tuple[Executor, ...]]] = [
            (lstm(), ("auto",)), (_models.mlp(), ("vmap", "general"))]
        for w, executors in runs:
            fns = {"plain": _models.plain_step(w)}
            fns.update({e: _dp(w, fdp.Mesh(n, executor=e)) for e in executors})
            res = time_interleaved(fns, rounds)
            base = res["plain"]
            table.append({"measure": "fallback", "name": f"{w.name}: plain module fwd+bwd",
                          **base, "ratio": None})
            for e in executors:
                what = "auto (falls back: no vmap rule)" if e == "auto" else f"executor={e}"
                table.append({"measure": "fallback", "name": f"{w.name}: fdp N={n} {what}",
                              **res[e], "ratio": res[e]["median_ms"] / base["median_ms"]})
