"""The ``compile`` section's recompilation count: how many times torch.compile compiles a step
that is called with varying batch sizes (dynamo's ``CompileCounter`` backend counts the frames
it compiles and runs their graphs as captured, so this measures recompilation, not inductor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad_and_value

import fdp
from fdp._compat import compile_counter
from fdp.bench._models import Workload

__all__ = ["SIZES", "compile_counts"]

SIZES = (64, 72, 77, 96, 101, 128, 135, 160, 190, 224)  # even and uneven on Mesh(8)


def compile_counts(w: Workload, n: int, sizes: tuple[int, ...] = SIZES) -> dict[str, int]:
    """Compiles of each candidate over batches of ``sizes`` rows (the workload's batch's rows,
    repeated as needed)."""
    loss, params = w.loss_fn(), w.params()
    model = fdp.functionalize(w.module)

    def forward(p: dict, b: dict) -> torch.Tensor:
        return model.apply(p, model.buffers, b["x"])[0]

    def criterion(o: torch.Tensor, b: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(o, b["y"])

    split = fdp.split_loss(forward, criterion)
    mesh = fdp.Mesh(n, device=w.batch["x"].device)
    candidates: dict[str, Callable[..., Any]] = {
        "single-device": grad_and_value(loss),
        f"DP N={n} weighted": fdp.value_and_grad(loss, mesh),
        f"DP N={n} gather": fdp.value_and_grad(split, mesh, strategy="gather"),  # type: ignore[arg-type]  # a SplitLoss is callable
    }
    counts = {}
    for name, fn in candidates.items():
        torch.compiler.reset()
        counter = compile_counter()
        compiled = torch.compile(fn, backend=counter)
        for b in sizes:
            compiled(params, _rows(w.batch, b))
        counts[name] = counter.frame_count
    torch.compiler.reset()
    return counts


def _rows(batch: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """``b`` rows of ``batch``, cycling through its rows."""
    return {k: v[torch.arange(b, device=v.device) % v.shape[0]] for k, v in batch.items()}
