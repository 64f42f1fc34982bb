"""torch's raw errors from inside the replicas come back as fdp's, naming the argument, the key
path and the fix (``fdp/_explain.py``), with torch's error chained as the cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fdp

F64 = torch.float64


def _bn_model():
    return fdp.functionalize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train())


def _plain_loss(model):
    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch["x"])[0].pow(2).mean()
    return loss_fn


def _buffered_loss(model):
    def loss_fn(params, buffers, batch):
        out, new = model.apply(params, buffers, batch["x"])
        return out.pow(2).mean(), new
    return loss_fn


BATCH = {"x": torch.randn(8, 3)}
BN_PATH = r"BatchNorm1d layer '1' \(buffers\['1.running_mean'\]"


def _raises(exc, *patterns):
    """pytest.raises whose message matches all ``patterns`` in order."""
    return pytest.raises(exc, match=".*".join(patterns))


@pytest.mark.parametrize("mesh", [fdp.Mesh(4)], ids=["vmap"])
def test_batchnorm_in_training_without_a_policy(mesh):
    model = _bn_model()
    opt = fdp.optim.sgd(0.1)
    fix = (BN_PATH, r"buffer_policy='replica0', 'mean' or 'sync'",
           r"fdp.nn.convert_sync_batchnorm\(module\)", r"eval mode")
    with _raises(ValueError, r"^value_and_grad: ", *fix) as info:
        fdp.value_and_grad(_plain_loss(model), mesh)(model.params, BATCH)
    assert "Batch norm got a batched tensor" in str(info.value.__cause__)
    with _raises(ValueError, r"^value_and_grad: ", *fix):  # the step's value_and_grad
        fdp.data_parallel_step(_plain_loss(model), opt, mesh)(
            fdp.TrainState.create(model.params, opt), BATCH)
    with _raises(ValueError, r"^pmap: ", BN_PATH, r"fdp.replicate\(buffers, mesh\)",
                 "buffer_policy="):
        fdp.pmap(lambda p, x: model.apply(p, model.buffers, x)[0], mesh, in_axes=(None, 0))(
            model.params, torch.randn(4, 2, 3))


def test_batchnorm_with_a_policy_but_the_closure_buffers():
    model = _bn_model()

    def loss_fn(params, buffers, batch):  # ignores the buffers it gets
        out, new = model.apply(params, model.buffers, batch["x"])
        return out.pow(2).mean(), new

    with _raises(ValueError, BN_PATH, r"buffer_policy='mean', pass the buffers loss_fn "
                 r"receives to model.apply"):
        fdp.value_and_grad(loss_fn, fdp.Mesh(4), buffer_policy="mean")(
            model.params, model.buffers, BATCH)


def test_random_ops_without_randomness():
    model = fdp.functionalize(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)))

    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch["x"])[0].pow(2).mean()

    with _raises(ValueError, r"^value_and_grad: torch.nn.functional.dropout, called at "
                 r".*test_explain.py:\d+ `return model.apply", "randomness='different'",
                 r"'same'", r"key=", r"fdp.nn.convert_dropout\(module\)") as info:
        fdp.value_and_grad(loss_fn, fdp.Mesh(4))(model.params, BATCH)
    assert "randomness error mode" in str(info.value.__cause__)
    with _raises(ValueError, r"^pmap: the op at .*`.*torch.randn\(3\)",
                 r"randomness='different'"):
        fdp.pmap(lambda x: x + torch.randn(3), fdp.Mesh(2))(torch.ones(2, 3))


def test_a_loss_with_the_wrong_arity_for_the_buffer_policy():
    model = _bn_model()
    mesh = fdp.Mesh(4)
    with _raises(TypeError, r"^value_and_grad: loss_fn is loss_fn\(params, batch\)",
                 r"buffer_policy='mean' it is called as loss_fn\(params, buffers, batch\)",
                 r"\(loss, new_buffers\)"):
        fdp.value_and_grad(_plain_loss(model), mesh, buffer_policy="mean")(
            model.params, model.buffers, BATCH)
    with _raises(TypeError, r"loss_fn is loss_fn\(params, buffers, batch\)",
                 r"no buffer_policy it is called as loss_fn\(params, batch\)",
                 r"needs buffer_policy="):
        fdp.value_and_grad(_buffered_loss(model), mesh)(model.params, BATCH)
    opt = fdp.optim.sgd(0.1)
    state = fdp.TrainState.create(model.params, opt, buffers=model.buffers)
    with _raises(TypeError, r"^data_parallel_step: loss_fn is loss_fn\(params, batch\)",
                 r"with_buffers=True it is called as loss_fn\(params, buffers, batch\)"):
        fdp.data_parallel_step(_plain_loss(model), opt, mesh, with_buffers=True)(state, BATCH)


def test_star_args_losses_and_inner_type_errors_stay_as_they_are():
    def star(*args):
        raise TypeError("my own bug")

    with pytest.raises(TypeError, match=r"^my own bug$"):
        fdp.value_and_grad(star, fdp.Mesh(2))({"w": torch.ones(3)}, torch.ones(4, 3))

    def inner(params, batch):
        return torch.add(params["w"], batch, "not an alpha").sum()

    with pytest.raises(TypeError) as info:
        fdp.value_and_grad(inner, fdp.Mesh(2))({"w": torch.ones(3)}, torch.ones(4, 3))
    assert "loss_fn is" not in str(info.value)


@pytest.mark.parametrize("mesh", [fdp.Mesh(4), fdp.Mesh(devices=["cpu", "cpu"])],
                         ids=["vmap", "threads"])
def test_float64_params_with_a_float32_batch(mesh):
    model = fdp.functionalize(nn.Linear(3, 2).double())

    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch["x"])[0].pow(2).mean()

    with _raises(TypeError, r"^value_and_grad: batch\['x'\] is torch.float32 but the params "
                 r"are torch.float64 \(e.g. params\['weight'\]\)", r"\.double\(\)",
                 r"\.to\(torch.float64\)") as info:
        fdp.value_and_grad(loss_fn, mesh)(model.params, BATCH)
    assert isinstance(info.value.__cause__, RuntimeError)
    with _raises(TypeError, r"^DataParallel: inputs\[0\] is torch.float32 but the params are "
                 r"torch.float64 \(e.g. module.weight\)"):
        fdp.DataParallel(nn.Linear(3, 2).double(), mesh)(torch.randn(4, 3))


def test_invalid_device_strings():
    with _raises(ValueError, r"^Mesh: devices\[1\]='cpux' is not a device", "'cuda:0'"):
        fdp.Mesh(devices=["cpu", "cpux"])
    with _raises(ValueError, r"^DataParallel: output_device='cpux' is not a device"):
        fdp.DataParallel(nn.Linear(3, 2), fdp.Mesh(2), output_device="cpux")


@pytest.mark.parametrize("opt", [fdp.optim.sgd(0.1, momentum=0.9), fdp.optim.adam(0.1),
                                 fdp.optim.rmsprop(0.1, centered=True)],
                         ids=["sgd", "adam", "rmsprop"])
def test_an_optimizer_state_of_other_params_is_blamed(opt):
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    grads = {"a": torch.ones(3), "b": torch.ones(2)}
    with _raises(ValueError, r"\.update: state\.\w+ does not match the grads: "
                 r"state\.\w+ has no entry for grads\['b'\]", r"the grads match the params",
                 r"opt.init\(params\)"):
        opt.update(grads, opt.init({"a": torch.ones(3)}), params)
    with _raises(ValueError, r"\.update: state\.\w+\['a'\] is torch.float32\[4\] but "
                 r"grads\['a'\] is torch.float32\[3\]", r"opt.init\(params\)"):
        opt.update(grads, opt.init({"a": torch.ones(4), "b": torch.ones(2)}), params)
    with _raises(ValueError, r"state\.\w+\['a'\] is torch.float64\[3\]"):
        opt.update(grads, opt.init({"a": torch.ones(3, dtype=F64), "b": torch.ones(2)}),
                   params)


def test_a_train_state_without_buffers_for_a_buffer_policy():
    model = _bn_model()
    opt = fdp.optim.sgd(0.1)
    step = fdp.data_parallel_step(_buffered_loss(model), opt, fdp.Mesh(4),
                                  buffer_policy="mean")
    with _raises(ValueError, r"^data_parallel_step: buffer_policy='mean' passes "
                 r"state.buffers to loss_fn, but state.buffers is empty",
                 r"fdp.TrainState.create\(params, optimizer, buffers=model.buffers\)"):
        step(fdp.TrainState.create(model.params, opt), BATCH)
    state = fdp.TrainState.create(model.params, opt, buffers=model.buffers)
    assert int(step(state, BATCH)[0].step) == 1


@pytest.mark.parametrize("mesh", [fdp.Mesh(4), fdp.Mesh(devices=["cpu"] * 4)],
                         ids=["vmap", "threads"])
def test_a_one_row_shard_with_batchnorm_in_data_parallel(mesh):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with _raises(ValueError, r"^DataParallel: the BatchNorm1d layer '1'", "1 row per channel",
                 r"splits into \(2, 2, 1, 0\)", r"buffer_policy='sync'"):
        fdp.DataParallel(net, mesh)(torch.randn(5, 3))
    model = _bn_model()
    with _raises(ValueError, r"^value_and_grad: the BatchNorm1d layer '1'", "1 row per channel",
                 r"splits into \(2, 2, 1, 0\)"):
        fdp.value_and_grad(_buffered_loss(model), mesh, buffer_policy="mean")(
            model.params, model.buffers, {"x": torch.randn(5, 3)})
