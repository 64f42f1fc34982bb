"""Law: data-parallel loss and gradients equal the single-device ones (docs/guarantees.md)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import grad_and_value

import fdp
from tests.helpers import (
    F32_REL,
    F64_REL,
    KwargsNet,
    assert_close,
    batch_sizes,
    cnn,
    mesh_sizes,
    splits,
)
from tests.helpers import mlp as make_mlp


def _single(loss_fn, params, batch):
    grads, loss = grad_and_value(loss_fn)(params, batch)
    return loss, grads


def _classifier(module: nn.Module, reduction: str = "mean"):
    model = fdp.functionalize(module)

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"], reduction=reduction)

    forward = lambda p, b: model.apply(p, model.buffers, b["x"])[0]  # noqa: E731
    criterion = lambda out, b: nn.functional.cross_entropy(  # noqa: E731
        out, b["y"], reduction=reduction)
    return model, loss_fn, fdp.split_loss(forward, criterion)


def _check(loss_fn, mesh, params, batch, split, rel, **kw):
    ref_loss, ref_grads = _single(loss_fn, params, batch)
    loss, grads = fdp.value_and_grad(loss_fn, mesh, split=split, **kw)(params, batch)
    assert_close(loss, ref_loss, rel)
    assert_close(grads, ref_grads, rel)


@given(n=mesh_sizes, b=batch_sizes, data=st.data(),
       strategy=st.sampled_from(["weighted", "gather"]), reduction=st.sampled_from(["mean",
                                                                                     "sum"]))
def test_mlp_float64(n, b, data, strategy, reduction):
    model, loss_fn, split_fn = _classifier(make_mlp().double(), reduction)
    batch = {"x": torch.randn(b, 5, dtype=torch.float64), "y": torch.randint(0, 3, (b,))}
    fn = split_fn if strategy == "gather" else loss_fn
    _check(fn, fdp.Mesh(n), model.params, batch, data.draw(splits(b, n)), F64_REL,
           strategy=strategy, reduction=reduction)


@given(n=mesh_sizes, b=batch_sizes, data=st.data(),
       strategy=st.sampled_from(["weighted", "gather"]))
def test_mlp_float32(n, b, data, strategy):
    model, loss_fn, split_fn = _classifier(make_mlp())
    batch = {"x": torch.randn(b, 5), "y": torch.randint(0, 3, (b,))}
    fn = split_fn if strategy == "gather" else loss_fn
    _check(fn, fdp.Mesh(n), model.params, batch, data.draw(splits(b, n)), F32_REL,
           strategy=strategy)


@given(n=mesh_sizes, b=batch_sizes, data=st.data(),
       strategy=st.sampled_from(["weighted", "gather"]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cnn(n, b, data, strategy, dtype):
    model, loss_fn, split_fn = _classifier(cnn().to(dtype))
    batch = {"x": torch.randn(b, 1, 8, 8, dtype=dtype), "y": torch.randint(0, 3, (b,))}
    fn = split_fn if strategy == "gather" else loss_fn
    rel = F64_REL if dtype == torch.float64 else F32_REL
    _check(fn, fdp.Mesh(n), model.params, batch, data.draw(splits(b, n)), rel,
           strategy=strategy)


@given(n=mesh_sizes, b=batch_sizes, data=st.data(), reduction=st.sampled_from(["mean", "sum"]),
       strategy=st.sampled_from(["weighted", "gather"]))
def test_kwargs_model_nested_batch(n, b, data, reduction, strategy):
    """kwargs into the model, a nested batch (dict, tuple), a non-tensor leaf, mean/sum loss."""
    model = fdp.functionalize(KwargsNet().double())
    reduce = torch.mean if reduction == "mean" else torch.sum

    def forward(params, batch):
        inputs = {"x": batch["inputs"]["x"], "aux": batch["inputs"]["aux"]}
        out, _ = model.apply(params, model.buffers, inputs, scale=batch["scale"],
                             mask=batch["mask"])
        return out

    loss_fn = fdp.split_loss(forward, lambda out, batch: reduce((out - batch["target"]) ** 2))

    f64 = dict(dtype=torch.float64)
    batch = {
        "inputs": {"x": torch.randn(b, 4, **f64), "aux": (torch.randn(b, 6, **f64),)},
        "mask": (torch.rand(b, **f64) > 0.3).double(),
        "target": torch.randn(b, **f64),
        "scale": 0.7,  # a non-tensor leaf: broadcast to every replica
    }
    _check(loss_fn, fdp.Mesh(n), model.params, batch, data.draw(splits(b, n)), F64_REL,
           reduction=reduction, strategy=strategy)


@given(n=mesh_sizes, b=st.integers(1, 16), data=st.data(), dim=st.sampled_from([1, -2]))
def test_batch_dim_1(n, b, data, dim):
    """Sequence-first batches: split along dim=1 (and gather outputs along dim=1)."""
    lin = nn.Linear(3, 2).double()
    model = fdp.functionalize(lin)

    def forward(p, batch):
        return model.apply(p, model.buffers, batch["x"])[0]  # [T, B, 2]

    def criterion(out, batch):
        return ((out - batch["y"]) ** 2).mean()

    loss = fdp.split_loss(forward, criterion)
    batch = {"x": torch.randn(4, b, 3, dtype=torch.float64),
             "y": torch.randn(4, b, 2, dtype=torch.float64)}
    split = data.draw(splits(b, n))
    for strategy in ("weighted", "gather"):
        _check(loss, fdp.Mesh(n), model.params, batch, split, F64_REL, dim=dim,
               strategy=strategy)


def test_has_aux_weighted_and_gather():
    model, loss_fn, split_fn = _classifier(make_mlp().double())
    batch = {"x": torch.randn(10, 5, dtype=torch.float64), "y": torch.randint(0, 3, (10,))}

    def with_aux(p, b):
        loss = loss_fn(p, b)
        return loss, {"n": torch.tensor(float(b["x"].shape[0]))}

    (loss, aux), grads = fdp.value_and_grad(with_aux, fdp.Mesh(4), has_aux=True)(
        model.params, batch)
    assert aux["n"].tolist() == [3.0, 3.0, 3.0, 1.0]  # chunk split of 10 over 4
    ref_loss, ref_grads = _single(loss_fn, model.params, batch)
    assert_close(loss, ref_loss, F64_REL)
    assert_close(grads, ref_grads, F64_REL)

    crit = fdp.split_loss(split_fn.forward, lambda o, b: (split_fn.criterion(o, b), o.shape[0]))
    (loss, rows), grads = fdp.value_and_grad(crit, fdp.Mesh(4), has_aux=True,
                                             strategy="gather")(model.params, batch)
    assert rows == 10
    assert_close(loss, ref_loss, F64_REL)
    assert_close(grads, ref_grads, F64_REL)


@pytest.mark.parametrize("grad_mode", ["plain", "func", "requires_grad"])
def test_composes_with_outer_transforms(grad_mode):
    """The tape-based fast path and the torch.func path give the same numbers."""
    model, loss_fn, _ = _classifier(make_mlp().double())
    batch = {"x": torch.randn(9, 5, dtype=torch.float64), "y": torch.randint(0, 3, (9,))}
    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(4), split="even")
    ref_loss, ref_grads = _single(loss_fn, model.params, batch)
    if grad_mode == "plain":
        loss, grads = vg(model.params, batch)
    elif grad_mode == "func":  # inside a torch.func transform: vmap over two copies of params
        stacked = {k: torch.stack([v, v]) for k, v in model.params.items()}
        losses, grads = torch.func.vmap(vg, in_dims=(0, None))(stacked, batch)
        loss, grads = losses[1], {k: g[1] for k, g in grads.items()}
    else:  # params that are part of an outer autograd graph: grads stay differentiable
        params = {k: v.clone().requires_grad_() for k, v in model.params.items()}
        loss, grads = vg(params, batch)
        assert all(g.requires_grad for g in grads.values())
    assert_close(loss.detach(), ref_loss, F64_REL)
    assert_close({k: g.detach() for k, g in grads.items()}, ref_grads, F64_REL)


def test_unused_parameter_gets_zero_grad():
    module = nn.ModuleDict({"used": nn.Linear(2, 1), "unused": nn.Linear(2, 1)}).double()
    model = fdp.functionalize(module)
    params = model.params

    def loss_fn(p, b):
        return (b @ p["used.weight"].T + p["used.bias"]).pow(2).mean()

    _, grads = fdp.value_and_grad(loss_fn, fdp.Mesh(2))(params, torch.randn(4, 2).double())
    assert torch.equal(grads["unused.weight"], torch.zeros_like(params["unused.weight"]))


def test_unweighted_mean_would_be_wrong():
    """The classic bug this API prevents: averaging per-replica means over uneven shards."""
    params = {"w": torch.tensor([1.0], dtype=torch.float64)}
    x = torch.tensor([[1.0], [2.0], [3.0], [10.0], [20.0]], dtype=torch.float64)

    def loss_fn(p, b):
        return (b * p["w"]).pow(2).mean()

    loss, _ = fdp.value_and_grad(loss_fn, fdp.Mesh(2), split=[3, 2])(params, x)
    naive = (loss_fn(params, x[:3]) + loss_fn(params, x[3:])) / 2
    assert_close(loss, loss_fn(params, x), F64_REL)
    assert abs(naive.item() - loss.item()) > 1.0


def test_documented_limits_raise_instead_of_diverging():
    """docs/guarantees.md: BatchNorm in training, dropout, and collectives in loss_fn raise."""
    mesh = fdp.Mesh(2)
    x = torch.randn(4, 3)
    for layer, pattern in ((nn.BatchNorm1d(4), r"buffers\['1.running_mean'\].*buffer_policy="),
                           (nn.Dropout(0.5), "dropout.*random.*randomness='different'")):
        model = fdp.functionalize(nn.Sequential(nn.Linear(3, 4), layer).train())

        def loss_fn(p, b, model=model):
            return model.apply(p, model.buffers, b)[0].pow(2).mean()

        with pytest.raises(ValueError, match=pattern):
            fdp.value_and_grad(loss_fn, mesh)(model.params, x)
    with pytest.raises(ValueError, match="same number of rows"):  # groups cannot talk
        fdp.value_and_grad(lambda p, b: fdp.pmean((b * p["w"]).mean(), "dp"), mesh)(
            {"w": torch.ones(3)}, torch.randn(5, 3))
    with pytest.raises(ValueError, match="unknown axis name"):
        fdp.value_and_grad(lambda p, b: fdp.pmean((b * p["w"]).mean(), "batch"), mesh)(
            {"w": torch.ones(3)}, x)


def test_collectives_in_loss_fn_see_the_mesh_axis():
    """With equal shards, loss_fn runs inside the mesh axis: pmean of the shard loss is the
    full-batch loss on every replica, so the weighted sum counts it once per replica."""
    mesh = fdp.Mesh(4)
    x = torch.randn(8, 3, dtype=torch.float64)
    params = {"w": torch.randn(3, dtype=torch.float64)}

    def loss_fn(p, b):
        return (b @ p["w"]).pow(2).mean()

    loss, grads = fdp.value_and_grad(lambda p, b: fdp.pmean(loss_fn(p, b), "dp"), mesh)(
        params, x)
    ref_loss, ref_grads = fdp.value_and_grad(loss_fn, fdp.Mesh(1))(params, x)
    assert_close(loss, ref_loss, F64_REL)
    assert_close(grads, ref_grads, F64_REL)
