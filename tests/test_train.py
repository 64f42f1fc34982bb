"""TrainState and data_parallel_step: k DP steps == k single-device steps; accumulation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import grad_and_value

import fdp
from tests.helpers import F32_REL, assert_close, assert_unchanged, mesh_sizes, snapshot, splits

REL = 1e-12  # float64 after k optimizer steps (worst seen in review runs: 7e-16)

OPTIMIZERS = {
    "sgd": lambda: fdp.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: fdp.optim.adam(1e-2, weight_decay=1e-3),
    "adamw": lambda: fdp.optim.adamw(fdp.optim.cosine_decay_schedule(1e-2, 10)),
}


def _problem(dtype=torch.float64):
    module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    model = fdp.functionalize(module)

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"])

    return model, loss_fn


def _batch(b, dtype=torch.float64):
    return {"x": torch.randn(b, 5, dtype=dtype), "y": torch.randint(0, 3, (b,))}


def _reference_step(loss_fn, optimizer):
    grad_fn = grad_and_value(loss_fn)

    def step(state, batch):
        grads, loss = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = fdp.optim.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    return step


@given(n=mesh_sizes, sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
       opt=st.sampled_from(sorted(OPTIMIZERS)), data=st.data())
def test_k_dp_steps_equal_k_single_device_steps(n, sizes, opt, data):
    model, loss_fn = _problem()
    optimizer = OPTIMIZERS[opt]()
    split = data.draw(splits(sizes[0], n))  # the first batch's split; later ones use "chunk"
    dp = ref = fdp.TrainState.create(model.params, optimizer)
    for i, b in enumerate(sizes):
        batch = _batch(b)
        step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(n),
                                      split=split if i == 0 else "chunk")
        dp, metrics = step(dp, batch)
        ref, ref_loss = _reference_step(loss_fn, optimizer)(ref, batch)
        assert_close(metrics["loss"], ref_loss, REL)
        assert int(metrics["num_examples"]) == b
    assert int(dp.step) == len(sizes)
    assert_close(dp.params, ref.params, REL)
    assert_close(dp.opt_state, ref.opt_state, REL)


@given(b=st.integers(1, 64), m=st.integers(1, 9), n=mesh_sizes,
       split=st.sampled_from(["even", "chunk"]))
def test_accumulation_equals_the_full_batch(b, m, n, split):
    model, loss_fn = _problem()
    batch = _batch(b)
    full_loss, full_grads = fdp.value_and_grad(loss_fn, fdp.Mesh(n))(model.params, batch)
    acc = fdp.accumulate(fdp.value_and_grad(loss_fn, fdp.Mesh(n)), m, split=split)
    loss, grads = acc(model.params, batch)
    assert_close(loss, full_loss, REL)
    assert_close(grads, full_grads, REL)


@given(b=st.integers(1, 40), m=st.integers(2, 6))
def test_accumulating_step_equals_full_batch_step(b, m):
    model, loss_fn = _problem()
    optimizer = fdp.optim.adam(1e-2)
    state = fdp.TrainState.create(model.params, optimizer)
    batch = _batch(b)
    full, _ = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(3))(state, batch)
    micro, metrics = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(3),
                                            microbatches=m)(state, batch)
    assert_close(micro.params, full.params, REL)
    assert int(metrics["num_examples"]) == b


def test_accumulate_with_sum_loss_and_aux():
    params = {"w": torch.randn(3, dtype=torch.float64)}
    x = torch.randn(11, 3, dtype=torch.float64)

    def vg(p, b):
        grads, loss = grad_and_value(lambda p: (b @ p["w"]).pow(2).sum())(p)
        return (loss, {"rows": torch.tensor([b.shape[0]])}), grads

    (loss, aux), grads = fdp.accumulate(vg, 4, has_aux=True, reduction="sum",
                                        split=[5, 0, 4, 2])(params, x)
    ref_grads, ref_loss = grad_and_value(lambda p: (x @ p["w"]).pow(2).sum())(params)
    assert_close(loss, ref_loss, REL)
    assert_close(grads, ref_grads, REL)
    assert [a["rows"].item() for a in aux] == [5, 4, 2]  # one aux per non-empty microbatch


def test_step_is_pure_and_compiles():
    model, loss_fn = _problem(torch.float32)
    optimizer = fdp.optim.adam(1e-2)
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(4), split="even")
    state = fdp.TrainState.create(model.params, optimizer)
    batch = _batch(13, torch.float32)
    before = snapshot((state, batch))
    eager, compiled = state, state
    compiled_step = torch.compile(step)
    for _ in range(3):
        eager, _ = step(eager, batch)
        compiled, _ = compiled_step(compiled, batch)
    assert_unchanged(before, (state, batch))
    assert_close(compiled.params, eager.params, F32_REL)
    assert_close(compiled.opt_state, eager.opt_state, F32_REL)


def test_has_aux_metrics():
    model, loss_fn = _problem()
    optimizer = fdp.optim.sgd(0.1)
    step = fdp.data_parallel_step(lambda p, b: (loss_fn(p, b), b["y"].float().mean()),
                                  optimizer, fdp.Mesh(2), has_aux=True)
    _, metrics = step(fdp.TrainState.create(model.params, optimizer), _batch(6))
    assert metrics["aux"].shape == (2,)


def test_bad_input():
    model, loss_fn = _problem()
    optimizer = fdp.optim.sgd(0.1)
    with pytest.raises(TypeError, match=r"optimizer must be an fdp\.optim GradientTransformation"):
        fdp.data_parallel_step(loss_fn, torch.optim.SGD, fdp.Mesh(2))
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2))
    with pytest.raises(TypeError, match=r"state must be an fdp\.TrainState"):
        step({"params": model.params}, _batch(4))
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        fdp.data_parallel_step(lambda p, b: loss_fn(p, b).expand(2), optimizer, fdp.Mesh(2))(
            fdp.TrainState.create(model.params, optimizer), _batch(4))
    with pytest.raises(ValueError, match="microbatches must be ≥ 1"):
        fdp.accumulate(fdp.value_and_grad(loss_fn, fdp.Mesh(2)), 0)


def test_with_buffers_reads_the_state_buffers():
    """BatchNorm in eval mode: the loss sees state.buffers (e.g. restored from a checkpoint)."""
    module = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    model = fdp.functionalize(module)

    def loss_fn(params, buffers, batch):
        out, _ = model.apply(params, buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"])

    optimizer = fdp.optim.sgd(0.1)
    buffers = {**model.buffers, "1.running_mean": torch.randn(4, dtype=torch.float64)}
    state = fdp.TrainState.create(model.params, optimizer, buffers=buffers)
    batch = _batch(9)
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(4), with_buffers=True)
    new, metrics = step(state, batch)
    ref_grads, ref_loss = grad_and_value(lambda p: loss_fn(p, buffers, batch))(state.params)
    assert_close(metrics["loss"], ref_loss, REL)
    expected = fdp.optim.apply_updates(state.params,
                                       optimizer.update(ref_grads, state.opt_state)[0])
    assert_close(new.params, expected, REL)
    assert new.buffers is state.buffers


def test_create_copies_and_validates():
    module = nn.Linear(2, 2)
    optimizer = fdp.optim.sgd(0.1)
    state = fdp.TrainState.create(fdp.functionalize(module).params, optimizer)
    with torch.no_grad():
        module.weight.add_(1.0)
    assert not torch.equal(state.params["weight"], module.weight)
    with pytest.raises(TypeError, match=r"optimizer must be an fdp\.optim"):
        fdp.TrainState.create(state.params, torch.optim.SGD)
    with pytest.raises(TypeError, match="seed must be an int"):
        fdp.TrainState.create(state.params, optimizer, seed="a")
    with pytest.raises(TypeError, match="buffers must be a dict"):
        fdp.TrainState.create(state.params, optimizer, buffers=[torch.ones(1)])


def test_step_option_combinations_are_checked():
    _, loss_fn = _problem()
    optimizer = fdp.optim.sgd(0.1)
    mesh = fdp.Mesh(2)
    with pytest.raises(TypeError, match="microbatches must be an int"):
        fdp.data_parallel_step(loss_fn, optimizer, mesh, microbatches=True)
    with pytest.raises(ValueError, match="strategy='weighted' with accumulation"):
        fdp.data_parallel_step(fdp.split_loss(lambda p, b: b["x"], lambda o, b: o.sum()),
                               optimizer, mesh, strategy="gather", microbatches=2)
    with pytest.raises(ValueError, match=r"split=\[3, 5\] gives the sizes of one batch"):
        fdp.data_parallel_step(loss_fn, optimizer, mesh, split=[3, 5], microbatches=2)
    with pytest.raises(TypeError, match=r"has_aux=True, value_and_grad_fn must return"):
        fdp.accumulate(lambda p, b: (torch.tensor(0.0), p), 2, has_aux=True)(
            {"w": torch.ones(1)}, torch.ones(4, 1))


@pytest.mark.parametrize("microbatches", [1, 3])
def test_compiled_step_is_one_graph_compiled_once(microbatches):
    """With unused="zeros": no graph breaks, and no recompilation for a repeated batch size
    (uneven split). With the default ("none"), whose missing gradients an eager run finds, the
    graph breaks stay but nothing compiles again after the second call."""
    from torch._dynamo.testing import CompileCounter

    model, loss_fn = _problem(torch.float32)
    optimizer = fdp.optim.adam(fdp.optim.cosine_decay_schedule(1e-2, 10))
    batch = _batch(13, torch.float32)
    for unused in ("zeros", "none") if microbatches == 1 else ("zeros",):
        torch._dynamo.reset()
        step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(4), microbatches=microbatches,
                                      unused=unused)
        state = fdp.TrainState.create(model.params, optimizer)
        counter = CompileCounter()
        compiled = torch.compile(step, backend=counter)
        for _ in range(2):  # the probe's answer is kept after the first call
            state, _ = compiled(state, batch)
        frames = counter.frame_count
        for _ in range(3):
            state, _ = compiled(state, batch)
        assert counter.frame_count == frames
        if unused == "zeros":
            assert frames == 1
            assert torch._dynamo.explain(step)(state, batch).graph_break_count == 0
    torch._dynamo.reset()
