"""Meshes of virtual replicas run every model: where torch.func.vmap cannot (recurrent nets,
packed sequences, masked attention, host reads, autocast), the general executor gives the
single-device result, with one warning naming the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fdp
from fdp.backends import _fallback
from tests.helpers import F32_REL, F64_REL, assert_close
from tests.zoo import SEQUENCE_MODELS, functional_loss, sequence_case

# torch's own notice when vmap runs an op through its slow generic fallback (before failing)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(autouse=True)
def _warnings_anew(monkeypatch):
    monkeypatch.setattr(_fallback, "_warned", set())


def _single_device(loss_fn, params, batch):
    """Tape autograd on the whole batch (torch.func.grad cannot run packed LSTMs either)."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = loss_fn(leaves, batch)
    grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
    return loss.detach(), dict(zip(leaves, grads, strict=True))


VMAP_CANNOT = {"lstm", "gru-bidirectional", "rnn", "lstm-packed-bidirectional", "branchy"}


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
@pytest.mark.parametrize("split", ["chunk", "even", [2, 0, 5]])
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, F64_REL), (torch.float32, F32_REL)])
def test_value_and_grad_falls_back_and_equals_one_device(name, split, dtype, rel):
    case = sequence_case(name, dtype=dtype)
    model, loss_fn = functional_loss(case)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", fdp.FallbackWarning)
        loss, grads = fdp.value_and_grad(loss_fn, fdp.Mesh(3), split=split)(
            model.params, case.batch)
    fell_back = [w for w in seen if issubclass(w.category, fdp.FallbackWarning)]
    assert len(fell_back) == (name in VMAP_CANNOT), [str(w.message) for w in seen]
    ref_loss, ref_grads = _single_device(loss_fn, model.params, case.batch)
    assert_close(loss, ref_loss, rel)
    assert_close(grads, ref_grads, rel)


def test_the_warning_names_the_op_and_comes_once():
    case = sequence_case("lstm")
    model, loss_fn = functional_loss(case)
    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(2))
    with pytest.warns(fdp.FallbackWarning, match=r"aten::lstm\.input.*executor='general'"):
        vg(model.params, case.batch)
    vg(model.params, case.batch)  # filterwarnings=error: a second warning would raise


def test_executor_vmap_raises_vmaps_error_and_general_never_warns():
    case = sequence_case("gru-bidirectional")
    model, loss_fn = functional_loss(case)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        fdp.value_and_grad(loss_fn, fdp.Mesh(2, executor="vmap"))(model.params, case.batch)
    loss, _ = fdp.value_and_grad(loss_fn, fdp.Mesh(2, executor="general"))(
        model.params, case.batch)
    assert_close(loss, loss_fn(model.params, case.batch), F64_REL)
    with pytest.raises(ValueError, match="unknown executor='thread'"):
        fdp.Mesh(2, executor="thread")


def test_errors_of_the_users_function_are_not_fallbacks():
    model = fdp.functionalize(nn.Linear(3, 2).double())

    def loss_fn(params, batch):
        raise RuntimeError("my own bug")

    with pytest.raises(RuntimeError, match="my own bug"):
        fdp.value_and_grad(loss_fn, fdp.Mesh(2))(model.params, torch.zeros(4, 3))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_training_steps_fall_back_and_equal_one_device(microbatches):
    case = sequence_case("lstm-packed-bidirectional", rows=9)
    model, loss_fn = functional_loss(case)
    optimizer = fdp.optim.adam(1e-2)
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(4), microbatches=microbatches)
    state = ref = fdp.TrainState.create(model.params, optimizer)
    with pytest.warns(fdp.FallbackWarning):
        for _ in range(3):
            state, _ = step(state, case.batch)
            _, grads = _single_device(loss_fn, ref.params, case.batch)
            updates, opt_state = optimizer.update(grads, ref.opt_state, ref.params)
            ref = ref._replace(params=fdp.optim.apply_updates(ref.params, updates),
                               opt_state=opt_state)
    assert_close(state.params, ref.params, F64_REL)


def test_pmap_with_collectives_falls_back():
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    model = fdp.functionalize(lstm)
    x = torch.randn(4, 2, 5, 3, dtype=torch.float64)

    def per_replica(v):
        out, _ = model.apply(model.params, model.buffers, v)
        return fdp.pmean(out[0].sum(), "dp"), fdp.axis_index("dp")

    with pytest.warns(fdp.FallbackWarning):
        mean, index = fdp.pmap(per_replica, fdp.Mesh(4))(x)
    expected = torch.stack([lstm(v)[0].sum() for v in x]).mean()
    torch.testing.assert_close(mean, expected.expand(4))
    assert index.tolist() == [0, 1, 2, 3]


def test_autocast_gives_one_devices_dtypes():
    lin = nn.Linear(3, 3)
    model = fdp.functionalize(lin)
    x = torch.randn(2, 4, 3)
    with torch.autocast("cpu", torch.bfloat16), pytest.warns(fdp.FallbackWarning,
                                                            match="autocast"):
        out = fdp.pmap(lambda v: model.apply(model.params, model.buffers, v)[0],
                       fdp.Mesh(2))(x)
        expected = lin(x[0])
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], expected)


def test_under_torch_func_the_vmap_error_explains_the_fallback():
    case = sequence_case("lstm")
    model, loss_fn = functional_loss(case)
    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(2))
    with pytest.raises(RuntimeError, match="Batching rule") as info:
        torch.func.grad(lambda p: vg(p, case.batch)[0])(model.params)
    assert "general executor" in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.filterwarnings("ignore::fdp.FallbackWarning")
@pytest.mark.parametrize("mesh", ["vmap", "threads"])
@pytest.mark.parametrize("name", ["lstm-packed-bidirectional", "masked-encoder", "branchy"])
def test_k_steps_equal_torch_optim(mesh, name):
    import copy

    from tests.zoo import mse

    case = sequence_case(name, rows=7)
    model, loss_fn = functional_loss(case)
    reference = copy.deepcopy(case.module)
    torch_opt = torch.optim.SGD(reference.parameters(), 0.1, momentum=0.9, weight_decay=0.01)
    optimizer = fdp.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    on = fdp.Mesh(3) if mesh == "vmap" else fdp.Mesh(devices=["cpu"] * 3)
    step = fdp.data_parallel_step(loss_fn, optimizer, on, split="even")
    state = fdp.TrainState.create(model.params, optimizer)
    for _ in range(3):
        state, _ = step(state, case.batch)
        torch_opt.zero_grad(set_to_none=True)
        mse(reference(case.batch["x"], case.batch["lengths"]), case.batch).backward()
        torch_opt.step()
    assert_close(state.params, {k: v.detach() for k, v in reference.named_parameters()},
                 F64_REL)
