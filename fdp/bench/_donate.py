"""``donate``: the optimizer update of ``fdp.data_parallel_step`` with each ``donate`` mode
against ``torch.optim``'s in-place step, and the whole step against a plain module step.

* ``update``: the optimizer alone on the MLP's params (0.67 M float32) with fixed gradients,
  on one torch thread (on a loaded 2-core machine, 2-thread kernels this short stall):
  fdp's update + ``apply_updates`` as the step runs them (``donate="none"``: fresh tensors;
  ``"auto"``: into recycled buffers; ``"state"``: into the donated state), and
  ``torch.optim.SGD`` / ``Adam`` ``step()`` (``foreach=False``, the CPU default) on the same
  params with ``.grad`` set. The loop is ``state = update(state)``, as in training.
* ``step``: ``fdp.data_parallel_step`` on ``fdp.Mesh(8)`` with SGD for each mode, against the
  plain module forward + backward + ``torch.optim.SGD.step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fdp
from fdp._donation import Donate, hand_over
from fdp._step_memory import StepMemory
from fdp.bench import _models
from fdp.bench._timing import time_interleaved

MODES: tuple[Donate, ...] = ("none", "auto", "state")


def _fdp_update(optimizer: Any, params: dict, grads: dict, donate: Donate
                ) -> Callable[[], None]:
    memory = StepMemory(donate, optimizer)
    box = [fdp.TrainState.create(params, optimizer)]

    def run() -> None:
        state = box[0]
        new_params, opt_state, donated = memory.update(optimizer, grads, state)
        new = state._replace(params=new_params, opt_state=opt_state)
        box[0] = hand_over(state, new) if donated else new

    return run


def _torch_update(kind: str, w: _models.Workload) -> Callable[[], None]:
    params = [p.detach().clone().requires_grad_() for p in w.module.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = (torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=False) if kind == "sgd"
           else torch.optim.Adam(params, lr=1e-3, foreach=False))
    return opt.step


def bench_donate(rounds: int, table: list) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine stalls 2-thread kernels of ~0.1 ms
    try:
        _bench_updates(rounds, table)
    finally:
        torch.set_num_threads(threads)
    _bench_step(_models.mlp(256), rounds, table)


def _bench_updates(rounds: int, table: list) -> None:
    w = _models.mlp(256)
    params = w.params()
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    for kind, optimizer in (("sgd", fdp.optim.sgd(0.01, momentum=0.9)),
                            ("adam", fdp.optim.adam(1e-3))):
        fns: dict[str, Callable[[], Any]] = {m: _fdp_update(optimizer, params, grads, m)
                                             for m in MODES}
        fns["torch"] = _torch_update(kind, w)
        res = time_interleaved(fns, rounds)
        label = f"update {kind}, 1 thread"
        table.append({"measure": "donate", "name": f"{label}: torch.optim", **res["torch"],
                      "ratio": None})
        for m in MODES:
            table.append({"measure": "donate", "name": f"{label}: fdp donate={m}", **res[m],
                          "ratio": res[m]["median_ms"] / res["torch"]["median_ms"]})


def _bench_step(w: _models.Workload, rounds: int, table: list) -> None:
    loss_fn, params = w.loss_fn(), w.params()
    fns: dict[str, Callable[[], Any]] = {}
    for m in MODES:
        step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.01), fdp.Mesh(8), donate=m)
        box = [fdp.TrainState.create(params, fdp.optim.sgd(0.01))]

        def run(step: Callable = step, box: list = box) -> None:
            box[0], _ = step(box[0], w.batch)

        fns[m] = run
    plain = _models.plain_step(w)
    optimizer = torch.optim.SGD(w.module.parameters(), lr=0.01)

    def torch_step() -> None:
        plain()  # zero_grad, forward, loss, backward
        optimizer.step()

    fns["torch"] = torch_step
    res = time_interleaved(fns, rounds)
    label = "step mlp B=256 sgd"
    table.append({"measure": "donate", "name": f"{label}: module + torch.optim",
                  **res["torch"], "ratio": None})
    for m in MODES:
        table.append({"measure": "donate", "name": f"{label}: fdp Mesh(8) donate={m}",
                      **res[m], "ratio": res[m]["median_ms"] / res["torch"]["median_ms"]})
