"""fdp.nn.SyncBatchNorm and convert_sync_batchnorm: the module path, conversion, purity."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.nn
from tests.helpers import F64_REL, assert_close, assert_unchanged, snapshot, splits


def _net(momentum: float | None, affine: bool) -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=momentum, affine=affine),
                        nn.ReLU(), nn.Linear(5, 2)).double()
    with torch.no_grad():  # non-trivial running statistics to start from
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(2)
    return net


def _single(net: nn.Module, x: torch.Tensor, cot: torch.Tensor):
    """The unconverted module on the whole batch: output, new buffers, parameter grads."""
    model = fdp.functionalize(net)
    params = {k: v.clone().requires_grad_() for k, v in model.params.items()}
    out, buffers = model.apply(params, model.buffers, x)
    grads = torch.autograd.grad((out * cot).sum(), list(params.values()))
    return out, buffers, dict(zip(params, grads, strict=True))


def _data_parallel(net, mesh, x, cot, split, replicated: bool):
    model = fdp.functionalize(fdp.nn.convert_sync_batchnorm(net))
    params = {k: v.clone().requires_grad_() for k, v in model.params.items()}
    buffers = fdp.replicate(model.buffers, mesh) if replicated else model.buffers
    before = snapshot(model.buffers)
    apply = fdp.pmap(model.apply, mesh, in_axes=(None, 0 if replicated else None, 0))
    res = apply(params, buffers, fdp.scatter(x, mesh, split=split))
    out_rep, new_buffers = res.data
    out = fdp.gather(fdp.Sharded(out_rep, res.layout), mesh)
    for v in new_buffers.values():
        assert torch.equal(v, v[:1].expand_as(v))
    grads = torch.autograd.grad((out * cot).sum(), list(params.values()))
    assert_unchanged(before, model.buffers)
    return out, {k: v[0] for k, v in new_buffers.items()}, dict(zip(params, grads, strict=True))


@given(n=st.integers(1, 8), b=st.integers(2, 20), data=st.data(),
       momentum=st.sampled_from([0.1, None]), affine=st.booleans(), replicated=st.booleans())
def test_converted_module_under_pmap_equals_module(n, b, data, momentum, affine, replicated):
    net = _net(momentum, affine)
    x, cot = torch.randn(b, 4, dtype=torch.float64), torch.randn(b, 2, dtype=torch.float64)
    expected = _single(copy.deepcopy(net), x, cot)
    actual = _data_parallel(net, fdp.Mesh(n), x, cot, data.draw(splits(b, n)), replicated)
    _assert_same(actual, expected)


def _assert_same(actual, expected, bias_before_bn: str = "0.bias") -> None:
    """Outputs, buffers and grads agree; the grad of a bias that feeds BN is exactly zero.

    BN subtracts the batch mean, so the preceding layer's bias has gradient 0: both sides hold
    only rounding there, compared against the scale of that layer's weight gradient.
    """
    scale = expected[2][bias_before_bn.replace("bias", "weight")].abs().max().item()
    for grads in (actual[2], expected[2]):
        assert grads.pop(bias_before_bn).abs().max().item() <= F64_REL * scale
    assert_close(actual, expected, F64_REL)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_outside_pmap_equals_torch_over_steps(momentum):
    """Eager use, several training steps then eval: the same numbers as torch's BatchNorm2d."""
    ref = nn.BatchNorm2d(3, momentum=momentum).double()
    bn = fdp.nn.convert_sync_batchnorm(ref)
    first = bn.running_mean
    before = snapshot(first)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        assert_close(bn(x), ref(x), F64_REL)
    assert_close(dict(bn.named_buffers()), dict(ref.named_buffers()), F64_REL)
    assert_unchanged(before, first)  # buffers are re-assigned, never written in place
    bn.eval()
    ref.eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert_close(bn(x), ref(x), F64_REL)
    assert bn.num_batches_tracked.item() == 3


def test_without_running_stats_eval_uses_batch_stats():
    ref = nn.BatchNorm1d(3, track_running_stats=False).double().eval()
    bn = fdp.nn.convert_sync_batchnorm(ref)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(bn(x), ref(x), F64_REL)
    assert dict(bn.named_buffers()) == {}


@pytest.mark.parametrize("layer", [
    nn.BatchNorm1d(4), nn.BatchNorm2d(4, affine=False), nn.BatchNorm3d(4, momentum=None),
    nn.BatchNorm1d(4, track_running_stats=False), nn.BatchNorm2d(4, eps=1e-3, bias=False),
    nn.SyncBatchNorm(4, momentum=0.3), nn.BatchNorm1d(4).eval(),
], ids=lambda m: f"{type(m).__name__}-{m.extra_repr()}-{'train' if m.training else 'eval'}")
def test_conversion_keeps_config_tensors_and_mode(layer):
    with torch.no_grad():
        for t in layer.parameters():
            t.normal_()
    net = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Sequential(layer))
    before = snapshot(dict(net.state_dict()))
    out = fdp.nn.convert_sync_batchnorm(net, axis_name="batch")
    new = out[1][0]
    assert type(new) is fdp.nn.SyncBatchNorm and new.axis_name == "batch"
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(new, attr) == getattr(layer, attr), attr
    assert (new.bias is None) == (layer.bias is None)
    old_state, new_state = net.state_dict(), out.state_dict()
    assert old_state.keys() == new_state.keys()
    for k, v in old_state.items():  # equal values, but copies
        assert torch.equal(new_state[k], v) and new_state[k].data_ptr() != v.data_ptr(), k
    assert type(net[1][0]) is type(layer) and net[1][0] is layer  # the input is untouched
    assert_unchanged(before, dict(net.state_dict()))
    assert all(p.requires_grad for p in out.parameters())


def test_top_level_layer_and_resync_to_another_axis():
    bn = fdp.nn.convert_sync_batchnorm(nn.BatchNorm1d(2))
    assert isinstance(bn, fdp.nn.SyncBatchNorm) and bn.axis_name == "dp"
    again = fdp.nn.convert_sync_batchnorm(bn, axis_name="data")
    assert again.axis_name == "data" and bn.axis_name == "dp"
    assert "axis_name='data'" in repr(again)


def test_module_without_batch_norm_is_a_copy():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.InstanceNorm1d(4))
    before = snapshot(dict(net.state_dict()))
    out = fdp.nn.convert_sync_batchnorm(net)
    assert out is not net and [type(m) for m in out.modules()] == [type(m) for m in
                                                                    net.modules()]
    assert_close(dict(out.state_dict()), dict(net.state_dict()), 0.0)
    assert out[0].weight is not net[0].weight
    assert_unchanged(before, dict(net.state_dict()))


def test_conversion_of_a_cnn_under_pmap():
    """BN2d after a convolution, through functionalize and pmap, uneven split."""
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(12, 2)).double()
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    cot = torch.randn(7, 2, dtype=torch.float64)
    expected = _single(copy.deepcopy(net), x, cot)
    _assert_same(_data_parallel(net, fdp.Mesh(3), x, cot, "chunk", True), expected)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "net", [nn.BatchNorm1d(2)], nn.BatchNorm1d])
def test_non_module_raises(value):
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        fdp.nn.convert_sync_batchnorm(value)


def test_bad_axis_name_raises():
    with pytest.raises(TypeError, match="axis_name must be a non-empty str"):
        fdp.nn.convert_sync_batchnorm(nn.BatchNorm1d(2), axis_name=0)
    with pytest.raises(TypeError, match="axis_name must be a non-empty str"):
        fdp.nn.SyncBatchNorm(2, axis_name="")


def test_uninitialized_lazy_batch_norm_raises():
    net = nn.Sequential(nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"module\.0 is a LazyBatchNorm1d .* run one forward"):
        fdp.nn.convert_sync_batchnorm(net)
    net(torch.randn(3, 2))  # initialized: it is a BatchNorm1d now
    assert isinstance(fdp.nn.convert_sync_batchnorm(net)[0], fdp.nn.SyncBatchNorm)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 1, 1, 1, 1)])
def test_module_input_dims(shape):
    with pytest.raises(ValueError, match="expected 2D to 5D input"):
        fdp.nn.SyncBatchNorm(2)(torch.randn(shape))


def test_module_batch_of_one_in_training_raises_and_keeps_buffers():
    net = fdp.nn.convert_sync_batchnorm(_net(0.1, True))
    before = snapshot(dict(net.named_buffers()))
    model = fdp.functionalize(net)
    mesh = fdp.Mesh(3)
    step = fdp.pmap(model.apply, mesh, in_axes=(None, 0, 0))
    with pytest.raises(ValueError, match="more than 1 value per channel in training; got 1 "):
        step(model.params, fdp.replicate(model.buffers, mesh),
             fdp.scatter(torch.randn(1, 4, dtype=torch.float64), mesh))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(torch.randn(1, 4, dtype=torch.float64))
    assert_unchanged(before, dict(net.named_buffers()))  # unlike torch, no count bump


# --- inside value_and_grad's fused step ---------------------------------------------------------

def _sync_loss(model):
    def loss_fn(params, buffers, batch):
        out, new_buffers = model.apply(params, buffers, batch)
        return out.pow(2).mean(), new_buffers
    return loss_fn


@pytest.mark.parametrize(("b", "n"), [(6, 4), (6, 3), (9, 4)])
def test_value_and_grad_sync_policy_with_empty_replicas(b, n):
    """chunk splits such as (2, 2, 2, 0): the fused step runs only replicas that hold rows."""
    net = _net(0.1, True)
    model = fdp.functionalize(fdp.nn.convert_sync_batchnorm(net))
    x = torch.randn(b, 4, dtype=torch.float64)
    step = fdp.value_and_grad(_sync_loss(model), fdp.Mesh(n), buffer_policy="sync")
    (loss, buffers), grads = step(model.params, model.buffers, x)
    ref = fdp.functionalize(net)
    ref_grads, (ref_loss, ref_buffers) = torch.func.grad_and_value(
        _sync_loss(ref), has_aux=True)(ref.params, ref.buffers, x)
    _assert_same((loss, buffers, grads), (ref_loss, ref_buffers, ref_grads))


def test_value_and_grad_sync_policy_one_row_raises():
    model = fdp.functionalize(fdp.nn.convert_sync_batchnorm(_net(0.1, True)))
    step = fdp.value_and_grad(_sync_loss(model), fdp.Mesh(4), buffer_policy="sync")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        step(model.params, model.buffers, torch.randn(1, 4, dtype=torch.float64))
