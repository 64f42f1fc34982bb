"""assert_dp_equivalent passes on models that train identically under data parallelism.

These are property tests over fdp.testing's own public strategies, so they test the
strategies too: every drawn per-example model, on every drawn mesh, batch size and split,
must pass.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from fdp.testing import assert_dp_equivalent
from fdp.testing import strategies as fst
from tests.testing.models import BNNet, RunningMax, mse, regression_batch


def _check(case, mb, **options):
    assert_dp_equivalent(case.module, case.loss_fn, case.batch, mb.mesh, split=mb.split,
                         inputs=case.inputs, **options)


@given(mb=fst.mesh_batches(max_batch=12), data=st.data())
def test_per_example_models_pass(mb, data):
    """MLP, CNN and the kwargs model, float64 and float32, with or without eval-mode BN and
    Dropout; any mesh 1..8 and split (uneven, zero-row replicas)."""
    case = data.draw(fst.model_cases(batch_size=mb.batch_size, batchnorm=None, dropout=None,
                                     training=False))
    _check(case, mb)


@given(mb=fst.mesh_batches(max_size=4, max_batch=10), data=st.data())
def test_training_steps_pass(mb, data):
    """k optimizer steps (SGD with momentum, Adam) equal k single-device steps."""
    case = data.draw(fst.model_cases(batch_size=mb.batch_size))
    optimizer = data.draw(st.sampled_from([fdp.optim.sgd(0.1, momentum=0.9),
                                           fdp.optim.adam(1e-2)]))
    _check(case, mb, steps=3, optimizer=optimizer)


@given(mb=fst.mesh_batches(max_size=4, max_batch=10), data=st.data())
def test_model_tuple_and_gather_strategy_pass(mb, data):
    """An fdp.Model instead of a module, and strategy='gather' (a criterion that is not a
    per-example mean: the outputs' batch standard deviation)."""
    case = data.draw(fst.model_cases(["mlp"], batch_size=mb.batch_size, dtypes=[torch.float64]))
    model = fdp.functionalize(case.module)
    assert_dp_equivalent(model, case.loss_fn, case.batch, mb.mesh, split=mb.split)

    def spread(out, batch):
        return case.loss_fn(out, batch) + (out.std(0).sum() if out.shape[0] > 1 else 0.0)

    assert_dp_equivalent(case.module, spread, case.batch, mb.mesh, split=mb.split,
                         strategy="gather")


@given(n=st.integers(1, 8), b=st.integers(2, 12),
       policy=st.sampled_from([None, "replica0", "mean", "sync"]))
def test_one_replica_is_single_device_even_with_train_mode_batchnorm(n, b, policy):
    """All rows on one replica (explicit split): per-replica statistics are the batch's."""
    split = [b] + [0] * (n - 1)
    if policy is None:
        policy = "replica0"
    assert_dp_equivalent(BNNet().double(), mse, regression_batch(b), fdp.Mesh(n),
                         split=split, buffer_policy=policy, steps=2)


@given(mb=fst.mesh_batches(max_batch=12))
def test_buffer_updates_that_replica0_keeps(mb):
    """A buffer only some rows update, all on replica 0: 'replica0' keeps the right one."""
    b, n = mb.batch_size, mb.mesh.size
    assert_dp_equivalent(nn.Sequential(nn.Linear(4, 5), RunningMax(), nn.Linear(5, 2)).double(),
                         mse, regression_batch(b), mb.mesh, split=[b] + [0] * (n - 1),
                         buffer_policy="replica0")


@given(mb=fst.mesh_batches(min_batch=2, max_batch=16, kinds=["chunk", "even"], divisible=True),
       data=st.data())
def test_sync_batchnorm_passes(mb, data):
    """A converted model with buffer_policy='sync' and equal shards trains as on one device."""
    fnn = pytest.importorskip("fdp.nn")
    case = data.draw(fst.model_cases(["mlp", "cnn"], batch_size=mb.batch_size, batchnorm=True))
    synced = fnn.convert_sync_batchnorm(case.module)
    assert_dp_equivalent(synced, case.loss_fn, case.batch, mb.mesh, split=mb.split,
                         inputs=case.inputs, buffer_policy="sync", steps=2)


def test_several_meshes_and_float32_defaults():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = regression_batch(13, dtype=torch.float32)
    assert_dp_equivalent(net, mse, batch, [fdp.Mesh(1), fdp.Mesh(3), fdp.Mesh(8)], steps=2)


def test_default_inputs_for_tensor_list_and_dict_batches():
    net = nn.Linear(3, 3).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    assert_dp_equivalent(net, lambda out, b: (out - b).pow(2).mean(), x)
    assert_dp_equivalent(net, lambda out, b: (out - b[1]).pow(2).mean(), [x, x.flip(0)])
    assert_dp_equivalent(net, lambda out, b: out.pow(2).mean(), {"x": x, "note": "constant"})


def test_sum_reduction():
    net = nn.Linear(3, 2).double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    assert_dp_equivalent(net, lambda out, b: ((out - b[1]) ** 2).sum(), batch, fdp.Mesh(3),
                         reduction="sum", steps=2, optimizer=fdp.optim.sgd(0.01))


def _threads_mesh(n: int) -> fdp.Mesh:
    try:
        return fdp.Mesh(devices=["cpu"] * n)
    except NotImplementedError:  # pragma: no cover - backends without threads
        pytest.skip("the threads backend is not available")


def test_threads_backend():
    mesh = _threads_mesh(3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    assert_dp_equivalent(net, mse, regression_batch(10), mesh, steps=2)
    with pytest.raises(AssertionError) as info:
        assert_dp_equivalent(BNNet().double(), mse, regression_batch(10), mesh,
                             buffer_policy="replica0")
    assert "BatchNorm1d at 'encoder.bn' uses per-replica" in str(info.value)
    assert "equal shards" not in str(info.value)  # uneven shards are fine for 'sync' on threads
