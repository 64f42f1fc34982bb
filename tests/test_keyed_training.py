"""data_parallel_step(key=...): keyed dropout trains exactly as on one device, on every backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from tests.helpers import F64_REL, assert_close

_THREADS: dict[int, fdp.Mesh] = {}


def _mesh(kind: str, n: int) -> fdp.Mesh:
    if kind == "vmap":
        return fdp.Mesh(n)
    if n not in _THREADS:
        _THREADS[n] = fdp.Mesh(devices=["cpu"] * n, timeout=30)
    return _THREADS[n]


def _model(seed: int) -> fdp.Model:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2),
                        nn.Dropout(0.2))
    return fdp.functionalize(fdp.nn.convert_dropout(net.double()))


def _loss(model: fdp.Model):
    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean()
    return loss_fn


def _batches(k: int, rows: int) -> list[dict]:
    return [{"x": torch.randn(rows, 4, dtype=torch.float64),
             "y": torch.randn(rows, 2, dtype=torch.float64)} for _ in range(k)]


def _single_device(model, batches, key, optimizer):
    """The oracle: plain torch.func.grad on the whole batch, step t in key fold_in(key, t)."""
    params, opt_state = dict(model.params), optimizer.init(model.params)
    for t, batch in enumerate(batches):
        with fdp.random.key_context(fdp.random.fold_in(key, t)):
            grads = torch.func.grad(_loss(model))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = fdp.optim.apply_updates(params, updates)
    return params


@given(kind=st.sampled_from(["vmap", "threads"]), n=st.integers(1, 4), rows=st.integers(1, 10),
       k=st.integers(1, 3), seed=st.integers(0, 20), split=st.sampled_from(["chunk", "even"]),
       microbatches=st.integers(1, 2))
def test_keyed_dropout_training_equals_single_device(kind, n, rows, k, seed, split,
                                                     microbatches):
    model, batches, key = _model(seed), _batches(k, rows), fdp.random.key(seed)
    optimizer = fdp.optim.sgd(0.1, momentum=0.9)
    step = fdp.data_parallel_step(_loss(model), optimizer, _mesh(kind, n), split=split,
                                  key=key, microbatches=microbatches)
    state = fdp.TrainState.create(model.params, optimizer)
    for batch in batches:
        state, _ = step(state, batch)
    assert_close(state.params, _single_device(model, batches, key, optimizer), F64_REL)


def test_the_same_key_reproduces_a_run_and_another_key_differs():
    model, batches = _model(0), _batches(2, 8)
    optimizer = fdp.optim.sgd(0.1)

    def run(key):
        step = fdp.data_parallel_step(_loss(model), optimizer, fdp.Mesh(4), key=key)
        state = fdp.TrainState.create(model.params, optimizer)
        for batch in batches:
            state, _ = step(state, batch)
        return state.params

    a, b, c = run(fdp.random.key(1)), run(fdp.random.key(1)), run(fdp.random.key(2))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_a_key_is_required_by_keyed_layers_and_checked():
    model = _model(0)
    with pytest.raises(RuntimeError, match="random key"):
        fdp.value_and_grad(_loss(model), fdp.Mesh(2))(model.params, _batches(1, 4)[0])
    with pytest.raises((TypeError, ValueError), match="data_parallel_step"):
        fdp.data_parallel_step(_loss(model), fdp.optim.sgd(0.1), fdp.Mesh(2), key=3)
