"""assert_dp_equivalent modifies nothing it is given and rejects bad arguments clearly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from fdp.testing import Args, assert_dp_equivalent
from fdp.testing import strategies as fst
from tests.helpers import assert_unchanged, snapshot
from tests.testing.models import BNNet, CenterNet, mse, regression_batch


def _state(module: nn.Module) -> dict:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@given(mb=fst.mesh_batches(min_batch=2, max_batch=10), steps=st.integers(1, 3),
       policy=st.sampled_from([None, "replica0", "mean", "sync"]),
       make=st.sampled_from([BNNet, CenterNet]))
def test_inputs_are_not_modified_pass_or_fail(mb, steps, policy, make):
    """Module params/buffers (values and version counters), the batch, .grad fields, the
    train/eval mode and torch's RNG state are unchanged, whether the check passes or fails."""
    module = make().double()
    batch = regression_batch(mb.batch_size)
    before = snapshot((_state(module), batch))
    rng = torch.get_rng_state()
    with contextlib.suppress(AssertionError):
        assert_dp_equivalent(module, mse, batch, mb.mesh, split=mb.split, steps=steps,
                             buffer_policy=policy)
    assert_unchanged(before, (_state(module), batch))
    assert all(p.grad is None for p in module.parameters()) and module.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_model_state_is_not_modified():
    model = fdp.functionalize(BNNet().double())
    batch = regression_batch(8)
    before = snapshot((model.params, model.buffers, batch))
    with pytest.raises(AssertionError):
        assert_dp_equivalent(model, mse, batch, fdp.Mesh(2), buffer_policy="mean")
    assert_unchanged(before, (model.params, model.buffers, batch))


def test_kwargs_inputs_with_args():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, y, *, scale):
            return self.fc(x) * scale + y

    batch = {"a": torch.randn(7, 3, dtype=torch.float64),
             "b": torch.randn(7, 2, dtype=torch.float64)}
    assert_dp_equivalent(Scaled().double(), lambda out, b: out.pow(2).mean(), batch, fdp.Mesh(3),
                         inputs=lambda b: Args(b["a"], b["b"], scale=3.0))


_NET = nn.Linear(4, 2).double()
_BATCH = regression_batch(6)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"model_or_apply": "net"}, TypeError, "model_or_apply must be a torch.nn.Module or an "
                                           "fdp.Model"),
    ({"model_or_apply": lambda p, b, x: (x, b)}, TypeError, "model_or_apply"),
    ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
    ({"batch": (torch.zeros(0, 4), torch.zeros(0, 2))}, ValueError, "batch is empty"),
    ({"batch": ("x", "y")}, ValueError, "batch has no tensor leaves"),
    ({"batch": (torch.zeros(3, 4), torch.zeros(4, 2))}, ValueError, "disagree on the batch"),
    ({"mesh": 4}, TypeError, "mesh must be an fdp.Mesh"),
    ({"mesh": []}, TypeError, "mesh must be an fdp.Mesh"),
    ({"split": "halves"}, ValueError, "unknown split='halves'"),
    ({"split": [3, 3]}, ValueError, r"split=\[3, 3\] must list 4 ints"),
    ({"split": [1, 1, 1, 1]}, ValueError, "sums to 4 but the batch has 6 rows"),
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"steps": 2.0}, TypeError, "steps must be an int"),
    ({"optimizer": torch.optim.SGD}, TypeError, "optimizer must be an fdp.optim optimizer"),
    ({"buffer_policy": "first"}, ValueError, "unknown buffer_policy='first'"),
    ({"strategy": "ddp"}, ValueError, "unknown strategy='ddp'"),
    ({"reduction": "max"}, ValueError, "unknown reduction='max'"),
    ({"randomness": "other"}, ValueError, "unknown randomness='other'"),
    ({"inputs": "x"}, TypeError, "inputs must be callable"),
    ({"rtol": -1.0}, ValueError, "rtol must be a number >= 0"),
    ({"atol": "big"}, ValueError, "atol must be a number >= 0"),
    ({"strategy": "gather", "buffer_policy": "mean"}, ValueError, "buffer_policy works with "
                                                                   "strategy='weighted'"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    call = {"model_or_apply": _NET, "loss_fn": mse, "batch": _BATCH, "mesh": fdp.Mesh(4),
            **kwargs}
    with pytest.raises(error, match=match) as info:
        assert_dp_equivalent(**call)
    assert str(info.value).startswith("assert_dp_equivalent")


def test_batch_without_a_default_input():
    with pytest.raises(ValueError, match="pass inputs="):
        assert_dp_equivalent(_NET, mse, {"features": _BATCH[0]})


def test_loss_must_be_a_scalar():
    with pytest.raises(ValueError, match=r"must return a floating-point scalar tensor, got "
                                         r"torch.float64\[6, 2\]"):
        assert_dp_equivalent(_NET, lambda out, b: (out - b[1]) ** 2, _BATCH)


def test_single_device_errors_propagate_unchanged():
    def broken(out, batch):
        raise KeyError("label")

    with pytest.raises(KeyError, match="label"):
        assert_dp_equivalent(_NET, broken, _BATCH)
