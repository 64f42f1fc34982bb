"""Laws: a parameter without a gradient — frozen (``requires_grad=False``) or unused by the loss —
is left exactly as torch.optim leaves a parameter whose ``.grad`` is ``None``: by every fdp.optim
optimizer, and by ``data_parallel_step`` on every mesh, with microbatches."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.optim as optim
from tests.helpers import F64_REL, assert_close
from tests.optim.trees import make, structures

f64 = torch.float64

# (ours, torch's, whether a parameter may also miss only some steps: all of them, Adam counting
# each parameter's own steps as torch does; SGD's first-step rule would differ with dampening)
OPTIMIZERS = {
    "sgd": (lambda: optim.sgd(0.1), lambda p: torch.optim.SGD(p, 0.1), True),
    "sgd-momentum-wd": (lambda: optim.sgd(0.05, 0.9, weight_decay=0.1),
                        lambda p: torch.optim.SGD(p, 0.05, 0.9, weight_decay=0.1), True),
    "sgd-nesterov": (lambda: optim.sgd(0.05, 0.9, nesterov=True),
                     lambda p: torch.optim.SGD(p, 0.05, 0.9, nesterov=True), True),
    "rmsprop-centered-momentum": (
        lambda: optim.rmsprop(0.01, momentum=0.5, centered=True, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, 0.01, momentum=0.5, centered=True, weight_decay=0.1),
        True),
    "adam-wd": (lambda: optim.adam(0.01, weight_decay=0.1),
                lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.1), True),
    "adamw": (lambda: optim.adamw(0.01, weight_decay=0.1),
              lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.1), True),
    "adamw-amsgrad": (lambda: optim.adamw(0.01, weight_decay=0.1, amsgrad=True),
                      lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.1, amsgrad=True),
                      True),
}


def _run_torch(make_opt, params: dict, grads_seq: list[dict], clip: float | None = None):
    ps = {k: nn.Parameter(v.detach().clone()) for k, v in params.items()}
    opt = make_opt(list(ps.values()))
    for grads in grads_seq:
        for k, p in ps.items():
            p.grad = None if grads[k] is None else grads[k].detach().clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)
        opt.step()
    return {k: p.detach() for k, p in ps.items()}


def _run_ours(opt, params: dict, grads_seq: list[dict]):
    state = opt.init(params)
    for grads in grads_seq:
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@given(data=st.data())
def test_optimizers_skip_missing_gradients_as_torch_optim(name, data):
    ours, theirs, any_steps = OPTIMIZERS[name]
    structure = data.draw(structures)
    params = fdp.tree.flatten(make(structure, f64))[0]
    params = {f"p{i}": x for i, x in enumerate(params)}
    k = data.draw(st.integers(2, 5))
    never = data.draw(st.sets(st.sampled_from(sorted(params))))  # frozen: no grad, ever
    sometimes = data.draw(st.sets(st.sampled_from(sorted(params)))) if any_steps else set()
    grads_seq = []
    for step in range(k):
        miss = never | (sometimes if data.draw(st.booleans(), label=f"skip {step}") else set())
        grads_seq.append({n: None if n in miss else torch.randn_like(p)
                          for n, p in params.items()})
    got = _run_ours(ours(), params, grads_seq)
    want = _run_torch(theirs, params, grads_seq)
    assert_close(got, want, 1e-12)
    for n in never:
        assert torch.equal(got[n], params[n])  # untouched: no update, no decay


@given(data=st.data())
def test_clipping_leaves_missing_gradients_out_of_the_norm(data):
    params = {f"p{i}": torch.randn(3, dtype=f64) for i in range(3)}
    grads = [{"p0": torch.randn(3, dtype=f64) * 10, "p1": None, "p2": torch.randn(3, dtype=f64)}
             for _ in range(data.draw(st.integers(1, 3)))]
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.01, weight_decay=0.1))
    got = _run_ours(opt, params, grads)
    want = _run_torch(lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.1), params, grads,
                      clip=1.0)
    assert_close(got, want, 1e-12)


class _Partly(nn.Module):
    """A frozen embedding-like first layer, a trained body, a tied head, and an unused
    parameter (as a layer kept for another task)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.body.weight  # tied
        self.spare = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(torch.tanh(self.stem(x)))))


def _partly() -> nn.Module:
    torch.manual_seed(0)
    module = _Partly().double()
    module.stem.requires_grad_(False)
    return module


def _torch_training(module: nn.Module, batches: list[dict], make_opt, clip: float | None):
    module = copy.deepcopy(module)
    opt = make_opt([p for p in module.parameters()])
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = (module(batch["x"]) - batch["y"]).square().mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(module.parameters()), clip)
        opt.step()
    return {k: v.detach() for k, v in module.named_parameters()}


def frozen_batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(7, 4, dtype=f64, generator=g),
             "y": torch.randn(7, 6, dtype=f64, generator=g)} for _ in range(3)]


def frozen_training(mesh: fdp.Mesh, optimizer: Any, microbatches: int, batches: list[dict],
                    compile: bool = False) -> tuple[dict, dict]:
    """``(params after data_parallel_step on each batch, params before)`` for ``_partly``."""
    model = fdp.functionalize(_partly())

    def loss_fn(params: dict, batch: dict) -> Any:
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).square().mean()

    step = fdp.data_parallel_step(loss_fn, optimizer, mesh, microbatches=microbatches)
    if compile:
        step = torch.compile(step)
    state = fdp.TrainState.create(model.params, optimizer)
    for batch in batches:
        state, _ = step(state, batch)
    return state.params, model.params


def _mesh(kind: str) -> fdp.Mesh:
    return fdp.Mesh(3) if kind == "vmap" else fdp.Mesh(devices=["cpu"] * 3)


@pytest.mark.parametrize("mesh", ["vmap", "threads"])
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adamw", "clip+adamw"])
def test_training_leaves_frozen_and_unused_parameters_as_torch_optim(mesh, microbatches, name):
    clip = 0.5 if name == "clip+adamw" else None
    ours_opt, theirs, _ = OPTIMIZERS["adamw" if clip else name]
    optimizer = optim.chain(optim.clip_by_global_norm(clip), ours_opt()) if clip else ours_opt()
    batches = frozen_batches()
    got, before = frozen_training(_mesh(mesh), optimizer, microbatches, batches)
    want = _torch_training(_partly(), batches, theirs, clip)
    assert_close(got, want, F64_REL)
    for name_ in ("stem.weight", "stem.bias", "spare"):  # exactly as they were
        assert torch.equal(got[name_], before[name_])


@pytest.mark.parametrize("microbatches", [2])  # [1] is the same probe, one call per step
def test_compiled_training_leaves_frozen_and_unused_parameters_as_torch_optim(microbatches):
    torch._dynamo.reset()
    batches = frozen_batches()
    batches.append({k: v[:5] for k, v in batches[0].items()})  # a new shape: a new probe
    got, before = frozen_training(fdp.Mesh(3), optim.adamw(0.01, weight_decay=0.1),
                                  microbatches, batches, compile=True)
    want = _torch_training(_partly(), batches,
                           lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.1), None)
    assert_close(got, want, F64_REL)
    for name_ in ("stem.weight", "stem.bias", "spare"):  # exactly as they were
        assert torch.equal(got[name_], before[name_])
    torch._dynamo.reset()


def test_value_and_grad_reports_missing_gradients_on_request():
    module = _partly()
    model = fdp.functionalize(module)

    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch)[0].square().mean()

    x = torch.randn(5, 4, dtype=f64)
    _, zeros = fdp.value_and_grad(loss_fn, fdp.Mesh(2))(model.params, x)
    for mesh in (fdp.Mesh(2), fdp.Mesh(devices=["cpu"] * 2)):
        _, grads = fdp.value_and_grad(loss_fn, mesh, unused="none")(model.params, x)
        assert {k for k, v in grads.items() if v is None} == {"stem.weight", "stem.bias",
                                                              "spare"}
        assert all(torch.equal(zeros[k], torch.zeros_like(zeros[k]))
                   for k, v in grads.items() if v is None)
        assert_close({k: v for k, v in grads.items() if v is not None},
                     {k: zeros[k] for k, v in grads.items() if v is not None}, F64_REL)
    with pytest.raises(ValueError, match="unknown unused='skip'"):
        fdp.value_and_grad(loss_fn, fdp.Mesh(2), unused="skip")
