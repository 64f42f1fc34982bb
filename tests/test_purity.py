"""No public function mutates its inputs: values and version counters are unchanged."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from tests.helpers import assert_unchanged, batch_sizes, mesh_sizes, snapshot, splits


def _model():
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return module, fdp.functionalize(module)


@given(n=mesh_sizes, b=batch_sizes, data=st.data())
def test_primitives_and_pmap_do_not_mutate(n, b, data):
    mesh = fdp.Mesh(n)
    batch = {"x": torch.randn(b, 3), "y": torch.randint(0, 2, (b,)), "note": "s"}
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    split = data.draw(splits(b, n))
    before = snapshot((batch, params))

    reps = fdp.replicate(params, mesh)
    sharded = fdp.scatter(batch, mesh, split=split)
    reps_before, shards_before = snapshot(reps), snapshot(sharded.data)

    def f(p, shard):
        out = torch.tanh(shard["x"] @ p["w"] + p["b"])
        return out - fdp.pmean(out.mean(0), "dp"), fdp.all_gather(out.sum(), "dp")

    outs = fdp.pmap(f, mesh, out_axes=(0, 0))(reps, sharded)
    assert isinstance(outs, fdp.Sharded) and outs.layout == sharded.layout
    outs = outs.data
    outs_before = snapshot(outs)
    fdp.gather(fdp.Sharded(outs[0], sharded.layout), mesh)
    fdp.all_reduce(outs[1], mesh, "max")
    fdp.all_reduce(outs[1], mesh, "mean", weights=sharded.counts)
    fdp.unreplicate(reps, mesh)
    assert_unchanged(before, (batch, params))
    assert_unchanged(reps_before, reps)
    assert_unchanged(shards_before, sharded.data)
    assert_unchanged(outs_before, outs)


@given(n=mesh_sizes, b=st.integers(1, 32), data=st.data(),
       strategy=st.sampled_from(["weighted", "gather"]))
def test_value_and_grad_and_apply_do_not_mutate(n, b, data, strategy):
    module, model = _model()
    module_before = snapshot(dict(module.state_dict()))
    batch = {"x": torch.randn(b, 3), "y": torch.randint(0, 2, (b,))}

    def forward(p, bt):
        return model.apply(p, model.buffers, bt["x"])[0]

    def criterion(out, bt):
        return nn.functional.cross_entropy(out, bt["y"])

    loss = fdp.split_loss(forward, criterion)
    before = snapshot((model.params, model.buffers, batch))
    split = data.draw(splits(b, n))
    fdp.value_and_grad(loss, fdp.Mesh(n), split=split, strategy=strategy)(model.params, batch)
    params = {k: v.clone().requires_grad_() for k, v in model.params.items()}
    before_grad = snapshot(params)
    fdp.value_and_grad(loss, fdp.Mesh(n), split=split, strategy=strategy)(params, batch)
    assert_unchanged(before_grad, params)
    assert all(p.grad is None for p in params.values())  # no .grad side effects
    assert_unchanged(before, (model.params, model.buffers, batch))
    assert_unchanged(module_before, dict(module.state_dict()))


def test_tree_helpers_do_not_mutate():
    tree = {"a": torch.randn(2, 3), "b": [torch.randn(3)]}
    before = snapshot(tree)
    flat, unravel = fdp.tree.ravel(tree)
    unravel(flat * 2)
    fdp.tree.unstack(fdp.tree.stack([tree, tree]))
    fdp.tree.map_with_path(lambda p, x: x + 1, tree)
    fdp.tree.allclose(tree, tree)
    assert_unchanged(before, tree)
