"""Buffer policies under data parallelism: "replica0", "mean" and "sync" (BatchNorm)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.nn
from tests.helpers import assert_unchanged, snapshot

_THREADS: dict[int, fdp.Mesh] = {}


def threads_mesh(n: int) -> fdp.Mesh:
    if n not in _THREADS:
        _THREADS[n] = fdp.Mesh(devices=["cpu"] * n, timeout=30)
    return _THREADS[n]


def _net(seed: int, bn: type = nn.BatchNorm1d, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), bn(4, momentum=momentum), nn.ReLU(),
                         nn.Linear(4, 2)).double().train()


def _loss_fn(model: fdp.Model):
    def loss_fn(params, buffers, batch):
        out, new_buffers = model.apply(params, buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean(), new_buffers
    return loss_fn


def _batch(rows: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(rows, 3, dtype=torch.float64),
            "y": torch.randn(rows, 2, dtype=torch.float64)}


def _close(actual, expected, rtol=1e-10, atol=1e-12):
    # BatchNorm makes some gradients 0 up to rounding: compare with a small absolute floor
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _single_device(net: nn.Module, batch: dict) -> tuple:
    """Plain torch on the whole batch: loss, grads and the module's updated buffers."""
    net = copy.deepcopy(net)
    loss = (net(batch["x"]) - batch["y"]).pow(2).mean()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    names = [k for k, _ in net.named_parameters()]
    return loss.detach(), dict(zip(names, grads, strict=True)), dict(net.named_buffers())


def _assert_sync_equals_single_device(net: nn.Module, batch: dict, mesh: fdp.Mesh,
                                      split: str = "chunk") -> None:
    model = fdp.functionalize(fdp.nn.convert_sync_batchnorm(net))
    (loss, buffers), grads = fdp.value_and_grad(_loss_fn(model), mesh, split=split,
                                                buffer_policy="sync")(
        model.params, model.buffers, batch)
    ref_loss, ref_grads, ref_buffers = _single_device(net, batch)
    _close(loss, ref_loss)
    _close(grads, ref_grads)
    _close(buffers, ref_buffers)


@given(n=st.integers(1, 4), per=st.integers(2, 4), seed=st.integers(0, 50),
       momentum=st.sampled_from([0.1, None]))
def test_sync_equals_single_device_on_vmap(n, per, seed, momentum):
    _assert_sync_equals_single_device(_net(seed, momentum=momentum), _batch(n * per),
                                      fdp.Mesh(n))


@given(n=st.integers(1, 4), rows=st.integers(2, 11), seed=st.integers(0, 50),
       split=st.sampled_from(["chunk", "even"]), momentum=st.sampled_from([0.1, None]))
def test_sync_equals_single_device_on_threads_with_uneven_shards(n, rows, seed, split,
                                                                 momentum):
    _assert_sync_equals_single_device(_net(seed, momentum=momentum), _batch(rows),
                                      threads_mesh(n), split)


@given(n=st.integers(1, 4), per=st.integers(2, 4), seed=st.integers(0, 50))
def test_replica0_is_what_nn_data_parallel_keeps(n, per, seed):
    """nn.DataParallel runs replica 0 (the original module) on the first torch.chunk piece and
    keeps its running stats; the gradient is that of the per-replica losses' weighted sum."""
    net = _net(seed)
    rows = n * per - (1 if n > 1 and per > 2 else 0)
    batch = _batch(rows)
    model = fdp.functionalize(net)
    (_, buffers), _ = fdp.value_and_grad(_loss_fn(model), fdp.Mesh(n),
                                         buffer_policy="replica0")(
        model.params, model.buffers, batch)
    first = copy.deepcopy(net)
    first(batch["x"].chunk(n)[0])  # what device 0's module does in nn.DataParallel
    _close(buffers, dict(first.named_buffers()))


@given(n=st.integers(2, 4), per=st.integers(2, 4), seed=st.integers(0, 50))
def test_mean_policy_and_its_documented_error(n, per, seed):
    """'mean' is exact for the running mean and misses the between-replica spread in the
    running variance (docs/training.md gives the formula checked here)."""
    net = _net(seed)
    batch = _batch(n * per)
    model = fdp.functionalize(net)
    (_, buffers), _ = fdp.value_and_grad(_loss_fn(model), fdp.Mesh(n), buffer_policy="mean")(
        model.params, model.buffers, batch)
    _, _, ref = _single_device(net, batch)
    _close(buffers["1.running_mean"], ref["1.running_mean"])
    h = net[0](batch["x"]).detach().unflatten(0, (n, per))  # BatchNorm's input per replica
    means, m = h.mean(1), 0.1
    spread = ((means - h.mean((0, 1))) ** 2).mean(0)  # between-replica variance of the means
    rows = n * per
    # unbiased single-device var = (Σ within + per * Σ (mean_r - mean)²) / (rows - 1)
    within = h.var(1, unbiased=False).sum(0) * per
    expected_gap = m * ((within + per * n * spread) / (rows - 1) - within / (n * (per - 1)))
    _close(ref["1.running_var"] - buffers["1.running_var"], expected_gap, rtol=1e-8,
           atol=1e-12)


def test_data_parallel_step_updates_buffers_and_equals_single_device():
    net = _net(0, bn=nn.BatchNorm1d)
    model = fdp.functionalize(fdp.nn.convert_sync_batchnorm(net))
    optimizer = fdp.optim.sgd(0.1, momentum=0.9)
    batches = [_batch(8) for _ in range(3)]
    states = []
    for mesh in (fdp.Mesh(4), threads_mesh(3)):
        step = fdp.data_parallel_step(_loss_fn(model), optimizer, mesh, buffer_policy="sync")
        state = fdp.TrainState.create(model.params, optimizer, buffers=model.buffers)
        before = snapshot(state)
        for b in batches:
            new_state, _ = step(state, b)
            assert_unchanged(before, state)
            state, before = new_state, snapshot(new_state)
        states.append(state)
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for b in batches:
        opt.zero_grad()
        (ref(b["x"]) - b["y"]).pow(2).mean().backward()
        opt.step()
    for state in states:
        _close(state.params, dict(ref.named_parameters()))
        _close(state.buffers, dict(ref.named_buffers()))
        assert int(state.buffers["1.num_batches_tracked"]) == 3


def test_inputs_untouched_when_the_step_fails():
    net = _net(0)
    model = fdp.functionalize(net)
    buffers = dict(model.buffers)
    before = snapshot((model.params, buffers))
    with pytest.raises(ValueError, match="1 row per channel"):
        fdp.value_and_grad(_loss_fn(model), fdp.Mesh(4), buffer_policy="mean")(
            model.params, buffers, _batch(7))  # chunk: (2, 2, 2, 1)
    assert_unchanged(before, (model.params, buffers))
    assert int(net[1].num_batches_tracked) == 0


def test_policy_errors():
    model = fdp.functionalize(_net(0))
    with pytest.raises(ValueError, match="unknown buffer_policy"):
        fdp.value_and_grad(_loss_fn(model), fdp.Mesh(2), buffer_policy="first")
    with pytest.raises(ValueError, match="unknown buffer_policy"):
        fdp.data_parallel_step(_loss_fn(model), fdp.optim.sgd(0.1), fdp.Mesh(2),
                               buffer_policy="avg")
    with pytest.raises(ValueError, match="same number of rows"):  # vmap + sync + uneven
        converted = fdp.functionalize(fdp.nn.convert_sync_batchnorm(_net(0)))
        fdp.value_and_grad(_loss_fn(converted), fdp.Mesh(2), buffer_policy="sync")(
            converted.params, converted.buffers, _batch(5))
    with pytest.raises(TypeError, match=r"return \(loss, new_buffers\)"):
        fdp.value_and_grad(lambda p, b, x: _loss_fn(model)(p, b, x)[0], fdp.Mesh(2),
                           buffer_policy="mean")(model.params, model.buffers, _batch(4))
    with pytest.raises(ValueError, match="keys"):
        fdp.value_and_grad(lambda p, b, x: (_loss_fn(model)(p, b, x)[0], {}), fdp.Mesh(2),
                           buffer_policy="mean")(model.params, model.buffers, _batch(4))


@pytest.mark.parametrize("mesh", [fdp.Mesh(2), threads_mesh(2)], ids=["vmap", "threads"])
def test_mean_policy_of_half_precision_buffers_does_not_overflow(mesh):
    """Row-count weights are normalised and accumulated in float64: 8192 rows of a float16
    BatchNorm would overflow float16 (max 65504) as raw counts times values near 200."""
    model = fdp.functionalize(nn.BatchNorm1d(2).half())
    x = (torch.randn(8192, 2) * 0.1 + 200).half()

    def loss_fn(params, buffers, batch):
        out, new = model.apply(params, buffers, batch)
        return out.float().square().mean(), new

    (_, kept), _ = fdp.value_and_grad(loss_fn, mesh, buffer_policy="mean")(
        model.params, model.buffers, x)
    expected = 0.1 * x.float().mean(0)  # momentum 0.1 from a zero running mean
    assert torch.isfinite(kept["running_mean"]).all()
    torch.testing.assert_close(kept["running_mean"].float(), expected, rtol=2e-3, atol=0)
