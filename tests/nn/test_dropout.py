"""Keyed dropout: DP equals single-device training with dropout, on every backend and split."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.random as R
from fdp.nn import Dropout, convert_dropout, dropout
from tests.helpers import F64_REL, assert_close, assert_unchanged, snapshot, splits

_THREADS: dict[int, fdp.Mesh] = {}


def _mesh(backend: str, n: int) -> fdp.Mesh:
    if backend == "vmap":
        return fdp.Mesh(n)
    if n not in _THREADS:  # one per size: its worker threads are reused
        _THREADS[n] = fdp.Mesh(devices=["cpu"] * n, timeout=30)
    return _THREADS[n]


def _model(seed: int) -> fdp.Model:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Dropout(0.5),
                        nn.Linear(16, 3)).double()
    return fdp.functionalize(convert_dropout(net))


def _batch(rows: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(rows, 5, dtype=torch.float64), "y": torch.randint(0, 3, (rows,))}


def _losses(model: fdp.Model):
    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"])

    forward = R.with_key(lambda p, b: model.apply(p, model.buffers, b["x"])[0])
    criterion = lambda out, b, key: nn.functional.cross_entropy(out, b["y"])  # noqa: E731
    return loss_fn, fdp.split_loss(forward, criterion)


def _single(loss_fn, params, batch, key):
    with R.key_context(key):
        grads, loss = torch.func.grad_and_value(loss_fn)(params, batch)
    return loss, grads


# --- the must-show: DP == single device ------------------------------------------------------

@given(n=st.integers(1, 6), b=st.integers(1, 24), data=st.data(), seed=st.integers(0, 2**32),
       backend=st.sampled_from(["vmap", "threads"]),
       strategy=st.sampled_from(["weighted", "gather"]))
def test_dp_with_dropout_equals_single_device(n, b, data, seed, backend, strategy):
    model, batch, key = _model(seed % 97), _batch(b), R.key(seed)
    loss_fn, split_fn = _losses(model)
    split = data.draw(splits(b, n))
    ref_loss, ref_grads = _single(loss_fn, model.params, batch, key)
    fn = split_fn if strategy == "gather" else R.with_key(loss_fn)
    before = snapshot((model.params, batch, key))
    loss, grads = fdp.value_and_grad(fn, _mesh(backend, n), split=split, strategy=strategy)(
        model.params, batch, key)
    assert_close(loss, ref_loss, F64_REL)
    assert_close(grads, ref_grads, F64_REL)
    assert_unchanged(before, (model.params, batch, key))


@pytest.mark.parametrize("backend", ["vmap", "threads"])
def test_a_key_reproduces_the_run_bit_for_bit_and_other_keys_differ(backend):
    model, batch = _model(0), _batch(11)
    vg = fdp.value_and_grad(R.with_key(_losses(model)[0]), _mesh(backend, 3))
    first = vg(model.params, batch, R.key(5))
    again = vg(model.params, batch, R.key(5))
    other = vg(model.params, batch, R.key(6))
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][k], again[1][k]) for k in first[1])
    assert not torch.equal(first[0], other[0])


def test_sgd_steps_with_per_step_keys_equal_single_device_and_repeat_exactly():
    model, batch = _model(1), _batch(13)
    loss_fn = _losses(model)[0]
    base = R.key(2024)

    def train(grad_fn, steps: int = 3) -> dict[str, torch.Tensor]:
        params = model.params
        for step in range(steps):
            _, grads = grad_fn(params, batch, R.fold_in(base, step))
            params = {k: v - 0.5 * grads[k] for k, v in params.items()}
        return params

    single = train(lambda p, b, k: _single(loss_fn, p, b, k))
    for backend in ("vmap", "threads"):
        vg = fdp.value_and_grad(R.with_key(loss_fn), _mesh(backend, 4), split="even")
        dp = train(vg)
        assert_close(dp, single, F64_REL)
        assert all(torch.equal(dp[k], train(vg)[k]) for k in dp)


def test_microbatches_with_a_row_offset_equal_the_full_batch():
    model, batch, key = _model(2), _batch(10), R.key(9)
    loss_fn = _losses(model)[0]
    ref_loss, ref_grads = _single(loss_fn, model.params, batch, key)

    def sliced(params, part, start):
        with R.key_context(key, row_offset=start):
            return loss_fn(params, part)

    vg = fdp.value_and_grad(sliced, fdp.Mesh(3))
    loss, grads = 0.0, dict.fromkeys(model.params, 0.0)
    for start, size in [(0, 4), (4, 6)]:
        part = {k: v[start:start + size] for k, v in batch.items()}
        part_loss, part_grads = vg(model.params, part, start)
        loss = loss + part_loss * size / 10
        grads = {k: grads[k] + part_grads[k] * size / 10 for k in grads}
    assert_close(loss, ref_loss, F64_REL)
    assert_close(grads, ref_grads, F64_REL)


# --- masks: per example, per replica, keep rate ----------------------------------------------

def _masks(mesh: fdp.Mesh, rows: int, width: int, p: float, key: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(rows, width)
    out = fdp.pmap(lambda s: dropout(s, p, key) != 0, mesh)(fdp.scatter(ones, mesh))
    return fdp.gather(out, mesh)


def test_replicas_get_different_masks_with_the_right_keep_rate():
    rows, width, p, key = 8, 5000, 0.3, R.key(3)
    single = dropout(torch.ones(rows, width), p, key) != 0
    for backend in ("vmap", "threads"):
        masks = _masks(_mesh(backend, 8), rows, width, p, key)
        assert torch.equal(masks, single)  # the same bits on every backend
    assert all(not torch.equal(single[0], single[i]) for i in range(1, rows))
    n = rows * width
    assert abs(single.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    per_row = single.double().mean(1)
    assert (per_row - (1 - p)).abs().max().item() < 5 * math.sqrt(p * (1 - p) / width)


def test_values_are_zero_or_scaled_and_the_row_dim_is_respected():
    x = torch.randn(6, 7, dtype=torch.float64)
    key = R.key(1)
    y = dropout(x, 0.25, key)
    keep = R.bernoulli(key, 0.75, 7, counter=torch.arange(6))
    assert torch.equal(y, x * (keep.double() / 0.75))
    assert torch.equal(dropout(x.T.contiguous(), 0.25, key, row_dim=1), y.T)
    assert torch.equal(dropout(x.T.contiguous(), 0.25, key, row_dim=-1), y.T)
    assert dropout(x, 0.25, key, training=False) is x
    assert dropout(x, 0.0, key) is x


# --- the module and the conversion -----------------------------------------------------------

def test_each_call_in_a_forward_draws_its_own_mask():
    layer = Dropout(0.5)
    x = torch.ones(4, 64)
    with R.key_context(R.key(0)):
        a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, dropout(x, 0.5, R.fold_in(R.key(0), 0)))
    assert torch.equal(b, dropout(x, 0.5, R.fold_in(R.key(0), 1)))


def test_the_module_needs_a_key_only_in_training():
    layer = Dropout(0.2)
    with pytest.raises(RuntimeError, match=r"fdp.nn.Dropout needs a random key.*key_context"):
        layer(torch.ones(2, 3))
    x = torch.ones(2, 3)
    assert layer.eval()(x) is x
    assert Dropout(0.0)(x) is x
    assert "p=0.2" in repr(layer) and "axis_name='b'" in repr(Dropout(0.1, axis_name="b"))


def test_convert_dropout_copies_and_keeps_p_and_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2, inplace=True),
                        nn.Sequential(nn.Dropout(0.4).eval(), nn.Dropout2d(0.1)))
    before = copy.deepcopy(net)
    converted = convert_dropout(net)
    assert type(converted[1]) is Dropout and converted[1].p == 0.2 and converted[1].training
    assert type(converted[2][0]) is Dropout and not converted[2][0].training
    assert type(converted[2][1]) is nn.Dropout2d  # other variants keep torch's RNG
    assert type(net[1]) is nn.Dropout and type(net[2][0]) is nn.Dropout
    assert converted[0].weight is not net[0].weight
    assert torch.equal(converted[0].weight, before[0].weight)
    assert type(convert_dropout(nn.Dropout(0.3))) is Dropout
    plain = convert_dropout(nn.Linear(2, 2))
    assert type(plain) is nn.Linear
    assert convert_dropout(nn.Dropout(), axis_name="rows").axis_name == "rows"


# --- transforms ------------------------------------------------------------------------------

def test_grad_and_vmap_through_dropout():
    x, key = torch.randn(3, 5, dtype=torch.float64), R.key(7)
    g = torch.func.grad(lambda v: dropout(v, 0.4, key).sum())(x)
    assert torch.equal(g, (dropout(x, 0.4, key) != 0).double() / 0.6)
    keys = R.split(key, 4)
    stacked = torch.func.vmap(lambda k: dropout(x, 0.4, k))(keys)
    assert torch.equal(stacked, torch.stack([dropout(x, 0.4, k) for k in keys]))


def test_compiled_step_with_the_key_context_gives_the_eager_numbers():
    # aot_eager: dynamo and AOT autograd trace the whole step (key context included) without
    # inductor's codegen, which tests/test_random.py checks on the samplers themselves.
    model, batch = _model(3), _batch(9)
    vg = fdp.value_and_grad(R.with_key(_losses(model)[0]), fdp.Mesh(3))
    eager = vg(model.params, batch, R.key(1))
    compiled = torch.compile(vg, backend="aot_eager")
    assert_close(compiled(model.params, batch, R.key(1)), eager, F64_REL)
    other = compiled(model.params, batch, R.key(2))  # a new key: new masks, same graph
    assert_close(other, vg(model.params, batch, R.key(2)), F64_REL)
    forward = torch.compile(lambda x, k: dropout(x, 0.5, k), backend="aot_eager",
                            fullgraph=True)
    assert torch.equal(forward(batch["x"], R.key(1)), dropout(batch["x"], 0.5, R.key(1)))


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.5", True, None])
def test_bad_probabilities(p):
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\)"):
        dropout(torch.ones(2, 2), p, R.key(0))
    with pytest.raises(ValueError, match=r"fdp.nn.Dropout: p must be"):
        Dropout(p)


def test_bad_inputs_name_the_argument():
    key = R.key(0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        dropout(torch.ones(2, 2, dtype=torch.int64), 0.5, key)
    with pytest.raises(ValueError, match="row_dim=2 is not a dim"):
        dropout(torch.ones(2, 2), 0.5, key, row_dim=2)
    with pytest.raises(ValueError, match="row_dim=0 is not a dim"):
        dropout(torch.tensor(1.0), 0.5, key)
    with pytest.raises(ValueError, match=r"key must be an int64 tensor of shape \(2,\)"):
        dropout(torch.ones(2, 2), 0.5, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="axis_name must be None or a non-empty str"):
        Dropout(0.5, axis_name="")
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        convert_dropout("net")
