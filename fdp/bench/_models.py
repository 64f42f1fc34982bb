"""The benchmark workloads: the models, batches and step functions being timed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value

import fdp
from fdp.backends import Executor


@dataclass
class Workload:
    name: str
    module: nn.Module
    batch: dict[str, torch.Tensor]

    def loss_fn(self) -> Callable[[dict, dict], torch.Tensor]:
        model = fdp.functionalize(self.module)

        def loss(params: dict, batch: dict) -> torch.Tensor:
            out, _ = model.apply(params, model.buffers, batch["x"])
            return nn.functional.cross_entropy(out, batch["y"])

        return loss

    def params(self) -> dict[str, torch.Tensor]:
        return fdp.functionalize(self.module).params

    def to(self, device: torch.device) -> Workload:
        """The same workload with its module and batch on ``device``."""
        return Workload(self.name, self.module.to(device),
                        {k: v.to(device) for k, v in self.batch.items()})


def mlp(batch_size: int = 256) -> Workload:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                           nn.Linear(512, 10))
    batch = {"x": torch.randn(batch_size, 784), "y": torch.randint(0, 10, (batch_size,))}
    return Workload(f"mlp 784-512-512-10 B={batch_size}", module, batch)


def cnn(batch_size: int = 64) -> Workload:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )
    batch = {"x": torch.randn(batch_size, 1, 28, 28), "y": torch.randint(0, 10, (batch_size,))}
    return Workload(f"cnn 2conv+fc 28x28 B={batch_size}", module, batch)


WORKLOADS = {"mlp": mlp, "cnn": cnn}
MEMORY_BATCH = {"mlp": 4096, "cnn": 1024}  # large enough that activations dominate the step


def plain_step(w: Workload) -> Callable[[], Any]:
    """The baseline: the module's own forward + backward (what a user writes today)."""
    module, batch = w.module, w.batch

    def step() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(module(batch["x"]), batch["y"])
        loss.backward()
        return loss

    return step


def functional_step(w: Workload, compiled: bool = False,
                    mode: str | None = None) -> Callable[[], Any]:
    """Single-device functional step: torch.func.grad of the same loss (``mode``: of
    ``torch.compile``, e.g. ``"reduce-overhead"`` for CUDA graphs)."""
    loss, params, batch = w.loss_fn(), w.params(), w.batch
    fn = grad_and_value(loss)
    if compiled:
        return _compiled(fn, mode, params, batch)
    return lambda: fn(params, batch)


def dp_step(w: Workload, n: int, compiled: bool = False,
            mode: str | None = None, executor: Executor = "auto") -> Callable[[], Any]:
    """fdp's data-parallel step over ``n`` virtual replicas (vmap backend), on the device of
    the workload's batch (``executor``: the mesh's, e.g. ``"replay"``)."""
    mesh = fdp.Mesh(n, device=w.batch["x"].device, executor=executor)
    vg = fdp.value_and_grad(w.loss_fn(), mesh)
    params, batch = w.params(), w.batch
    if compiled:
        return _compiled(vg, mode, params, batch)
    return lambda: vg(params, batch)


def _compiled(fn: Callable, mode: str | None, params: dict,
              batch: dict) -> Callable[[], Any]:
    compiled = torch.compile(fn, mode=mode)
    if mode != "reduce-overhead":
        return lambda: compiled(params, batch)

    def step() -> None:  # CUDA graphs: each call is a new step, its outputs are not kept
        torch.compiler.cudagraph_mark_step_begin()
        compiled(params, batch)

    return step
