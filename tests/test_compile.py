"""torch.compile: fdp steps compile to the eager numbers, or raise a clear error — never a
silently dropped collective (pytorch#129845)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fdp
from tests.helpers import F32_REL, F64_REL, assert_close

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # the fixture is in conftest.py


def _compiled_or_clear_error(fn, *args, fullgraph):
    """Runs ``torch.compile(fn)``; returns its output, or None if it raised our clear error.

    Without fullgraph the compiler must fall back to eager for the collectives (docs/index.md),
    so only fullgraph=True may raise.
    """
    if not fullgraph:
        return torch.compile(fn)(*args)
    try:
        return torch.compile(fn, fullgraph=fullgraph)(*args)
    except Exception as e:
        text = f"{e}\n{e.__cause__}"
        assert "cannot be traced by torch.compile" in text and "129845" in text, text
        return None


def _classifier():
    module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = fdp.functionalize(module)
    forward = lambda p, b: model.apply(p, model.buffers, b["x"])[0]  # noqa: E731
    criterion = lambda o, b: nn.functional.cross_entropy(o, b["y"])  # noqa: E731
    return model, fdp.split_loss(forward, criterion)


@pytest.mark.parametrize("strategy", ["weighted", "gather"])
def test_compiled_value_and_grad_is_exact(strategy):
    model, loss = _classifier()
    batch = {"x": torch.randn(11, 5, dtype=f64), "y": torch.randint(0, 3, (11,))}
    vg = fdp.value_and_grad(loss, fdp.Mesh(4), strategy=strategy)  # chunk: 3, 3, 3, 2
    eager = vg(model.params, batch)
    compiled = torch.compile(vg)(model.params, batch)
    assert_close(compiled, eager, F64_REL)


def test_compiled_training_step_float32():
    module = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    model = fdp.functionalize(module)

    def loss_fn(p, b):
        return nn.functional.cross_entropy(model.apply(p, model.buffers, b["x"])[0], b["y"])

    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(8), split="even")

    def step(params, batch):
        loss, grads = vg(params, batch)
        return loss, {k: params[k] - 0.1 * grads[k] for k in params}

    batch = {"x": torch.randn(30, 5), "y": torch.randint(0, 3, (30,))}
    eager, compiled, params = model.params, model.params, model.params
    step_c = torch.compile(step)
    for _ in range(3):
        _, eager = step(eager, batch)
        _, compiled = step_c(compiled, batch)
    assert_close(compiled, eager, F32_REL)
    assert not fdp.tree.allclose(eager, params)  # it did train


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_pmap_with_collectives(fullgraph):
    mesh = fdp.Mesh(4)
    x = torch.randn(4, 3, dtype=f64)

    def f(x):
        return fdp.pmap(lambda v: v - fdp.pmean(v, "dp") + fdp.psum(1.0, "dp"), mesh)(x)

    out = _compiled_or_clear_error(f, x, fullgraph=fullgraph)
    if out is not None:
        assert_close(out, f(x), F64_REL)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_grad_through_psum(fullgraph):
    """grad(pmap(psum)) and pmap(grad(psum)) — the case compile breaks upstream."""
    mesh = fdp.Mesh(3)
    w = torch.tensor(2.0, dtype=f64)
    x = torch.arange(1.0, 4.0, dtype=f64)

    def outer(w):
        return torch.func.grad(
            lambda w: fdp.pmap(lambda xi: fdp.psum(w * xi, "dp") * xi, mesh)(x).sum())(w)

    def inner(w):
        return fdp.pmap(torch.func.grad(lambda w, xi: fdp.psum(w * xi, "dp") * xi), mesh,
                        in_axes=(None, 0))(w, x)

    for fn in (outer, inner):
        torch._dynamo.reset()
        out = _compiled_or_clear_error(fn, w, fullgraph=fullgraph)
        if out is not None:
            assert_close(out, fn(w), F64_REL)
    assert_close(outer(w), x.sum() ** 2, F64_REL)
    assert_close(inner(w), x.sum() * x, F64_REL)


def test_compiled_apply_keeps_buffers_the_module_reassigns():
    """SyncBatchNorm replaces its buffers instead of writing into them; compiled apply must
    return the replacements, as eager apply does."""
    net = fdp.nn.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    model = fdp.functionalize(net)
    x = torch.randn(8, 3)
    eager = model.apply(model.params, model.buffers, x)[1]
    compiled = torch.compile(model.apply)(model.params, model.buffers, x)[1]
    assert int(compiled["1.num_batches_tracked"]) == 1
    torch.testing.assert_close(compiled, eager)


def test_compiled_step_with_zero_gradients_for_missing_ones_compiles_whole():
    model, loss = _classifier()
    optimizer = fdp.optim.adamw(0.01, weight_decay=0.1)
    state = fdp.TrainState.create(model.params, optimizer)
    batch = {"x": torch.randn(8, 5, dtype=f64), "y": torch.randint(0, 3, (8,))}
    step = fdp.data_parallel_step(loss, optimizer, fdp.Mesh(4), unused="zeros")
    compiled, _ = torch.compile(step, fullgraph=True)(state, batch)
    eager, _ = step(state, batch)
    assert_close(compiled.params, eager.params, F64_REL)
    with pytest.raises(ValueError, match="unused"):
        fdp.data_parallel_step(loss, optimizer, fdp.Mesh(4), unused="skip")


def _sync_bn_problem(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    model = fdp.functionalize(fdp.nn.convert_sync_batchnorm(net))

    def loss_fn(params, buffers, batch):
        out, new_buffers = model.apply(params, buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean(), new_buffers

    batch = {"x": torch.randn(8, 3, dtype=f64), "y": torch.randn(8, 2, dtype=f64)}
    return net, model, loss_fn, batch


def test_compiled_sync_batchnorm_is_one_graph_and_equals_eager_and_single_device():
    """buffer_policy="sync" on the vmap backend: the psums inside the vmapped loss and the
    replicas-agree check compile into the one graph (no graph break, no eager fallback)."""
    net, model, loss_fn, batch = _sync_bn_problem()
    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(4), buffer_policy="sync")
    explained = torch._dynamo.explain(vg)(model.params, model.buffers, batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons
    torch._dynamo.reset()
    (loss, buffers), grads = torch.compile(vg, fullgraph=True)(model.params, model.buffers,
                                                               batch)
    # BatchNorm makes the first bias's gradient 0 up to rounding: an absolute floor
    torch.testing.assert_close(((loss, buffers), grads), vg(model.params, model.buffers, batch),
                               rtol=1e-10, atol=1e-12)
    ref = copy.deepcopy(net)
    ref_loss = (ref(batch["x"]) - batch["y"]).pow(2).mean()
    ref_grads = dict(zip([k for k, _ in ref.named_parameters()],
                         torch.autograd.grad(ref_loss, list(ref.parameters())), strict=True))
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(buffers, dict(ref.named_buffers()), rtol=1e-10, atol=1e-12)


def test_compiled_sync_policy_still_refuses_unsynchronized_buffers():
    """The replicas-agree check is an in-graph assertion under compile: same message."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()  # not converted
    model = fdp.functionalize(net)
    vg = fdp.value_and_grad(
        lambda p, b, x: (model.apply(p, b, x)[0].sum(), model.apply(p, b, x)[1]),
        fdp.Mesh(2), buffer_policy="sync")
    with pytest.raises(RuntimeError, match=r"buffer_policy='sync' but buffer '1\.running_mean'"):
        torch.compile(vg)(model.params, model.buffers, torch.randn(6, 3, dtype=f64))


def test_compiled_collective_under_grad_inside_loss_raises():
    """torch.func.grad inside value_and_grad's loss_fn, with a psum inside it: the case
    pytorch#129845 gets wrong under compile; it raises, never a silently dropped psum."""
    mesh = fdp.Mesh(2)
    x = torch.arange(1.0, 5.0, dtype=f64).reshape(4, 1)

    def loss_fn(p, b):
        inner = torch.func.grad(lambda w: fdp.psum((w * b).sum(), "dp"))(p["w"])
        return (p["w"] * inner).sum()

    vg = fdp.value_and_grad(loss_fn, mesh)
    params = {"w": torch.tensor([2.0], dtype=f64)}
    eager = vg(params, x)
    with pytest.raises(Exception, match="129845"):
        torch.compile(vg, fullgraph=True)(params, x)
    torch._dynamo.reset()
    assert_close(torch.compile(vg)(params, x), eager, F64_REL)


def test_compiled_collectives_in_loss_with_a_nested_vmap_equal_eager():
    """psum inside a vmap nested in the replica, pmean and pmax at the replica's level: the
    compile-safe op passes through the inner level and reduces at the frame's."""
    mesh = fdp.Mesh(4)
    x = torch.randn(12, 3, dtype=f64)

    def loss_fn(p, b):
        rows = torch.func.vmap(lambda r: fdp.psum(r * p["w"], "dp"))(b)  # [rows, 3]
        centred = b * p["w"] - fdp.pmean((b * p["w"]).mean(0), "dp")
        top = fdp.pmax(p["w"] @ b.T, "dp")
        return (rows.sum(1) ** 2).mean() + (centred ** 2).mean() + top.mean()

    vg = fdp.value_and_grad(loss_fn, mesh)
    params = {"w": torch.randn(3, dtype=f64)}
    compiled = torch.compile(vg, fullgraph=True)(params, x)
    assert_close(compiled, vg(params, x), F64_REL)
