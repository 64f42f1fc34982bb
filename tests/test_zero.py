"""Sharded optimizer state (``shard_optimizer_state=True``, ZeRO-1) equals unsharded training."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.nn
from fdp import optim

f64 = torch.float64
RTOL = 1e-12


def zero_optimizer(name: str) -> optim.GradientTransformation:
    """The optimizers the equivalence tests train with."""
    if name == "sgd-momentum":
        return optim.sgd(0.05, momentum=0.9, weight_decay=0.01)
    if name == "adam":
        return optim.adam(0.02, weight_decay=0.01)
    if name == "rmsprop":
        return optim.rmsprop(0.01, momentum=0.5, centered=True)
    assert name == "clip+adamw"
    return optim.chain(optim.clip_by_global_norm(0.3),
                       optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 0.05, 2, 8),
                                   weight_decay=0.1))


class _Net(nn.Module):
    """Parameter sizes 10, 5, 2 (frozen), 10, 2, 1 (unused): none divisible by 3 or 4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 5)
        self.stem = nn.Linear(1, 1)
        self.head = nn.Linear(5, 2)
        self.spare = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)) + self.stem(x[:, :1]))


def zero_model() -> fdp.Model:
    torch.manual_seed(0)
    net = _Net().double()
    net.stem.requires_grad_(False)
    return fdp.functionalize(net)


def zero_batches(steps: int = 3, rows: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(rows, 2, dtype=f64, generator=g),
             "y": torch.randn(rows, 2, dtype=f64, generator=g)} for _ in range(steps)]


def zero_training(mesh: fdp.Mesh, opt_name: str, microbatches: int, shard: bool,
                  steps: int = 3) -> tuple[fdp.TrainState, list[torch.Tensor]]:
    """``steps`` data_parallel_steps of the frozen/unused model: (final state, losses)."""
    model = zero_model()

    def loss_fn(params: dict, batch: dict) -> Any:
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).square().mean()

    opt = zero_optimizer(opt_name)
    step = fdp.data_parallel_step(loss_fn, opt, mesh, microbatches=microbatches,
                                  shard_optimizer_state=shard)
    state = fdp.TrainState.create(model.params, opt, mesh=mesh, shard_optimizer_state=shard)
    losses = []
    for batch in zero_batches(steps):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, losses


def assert_params_close(got: dict, want: dict) -> None:
    for k, w in want.items():
        scale = max(w.abs().max().item(), 1e-300)
        assert (got[k] - w).abs().max().item() <= RTOL * scale, k


MESHES = {"vmap4": lambda: fdp.Mesh(4), "threads3": lambda: fdp.Mesh(devices=["cpu"] * 3)}


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam", "clip+adamw", "rmsprop"])
def test_sharded_steps_equal_unsharded_steps(mesh, microbatches, opt_name):
    m = MESHES[mesh]()
    want, want_losses = zero_training(m, opt_name, microbatches, shard=False)
    got, losses = zero_training(m, opt_name, microbatches, shard=True)
    assert_params_close(got.params, want.params)
    torch.testing.assert_close(torch.stack(losses), torch.stack(want_losses), rtol=RTOL, atol=0)
    before = zero_model().params
    for frozen in ("stem.weight", "stem.bias", "spare"):  # no gradient: untouched, bitwise
        assert torch.equal(got.params[frozen], before[frozen])
    assert int(got.step) == 3


def test_sharded_state_holds_one_slice_per_replica_and_leaves_frozen_state_alone():
    mesh = fdp.Mesh(4)
    state, _ = zero_training(mesh, "adam", 1, shard=True)
    sharded = state.opt_state
    assert isinstance(sharded, fdp.ShardedOptState) and sharded.mesh_size == 4
    mu = sharded.slices.mu
    assert mu["fc.weight"].shape == (4, 3)  # 10 elements: slices of 3, the last padded
    assert mu["spare"].shape == (4, 1)
    assert torch.equal(mu["fc.weight"].reshape(-1)[10:], torch.zeros(2, dtype=f64))
    for frozen in ("stem.weight", "stem.bias", "spare"):
        assert not mu[frozen].any() and not sharded.slices.nu[frozen].any()
    keys = list(zero_model().params)
    steps = sharded.slices.steps  # each replica counts each parameter's own steps
    assert steps.shape == (4, len(keys))
    assert [int(s) for s in steps[0]] == [0 if k.startswith(("stem", "spare")) else 3
                                         for k in keys]


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(1, 13), min_size=1, max_size=4),
       n=st.integers(2, 5), steps=st.integers(1, 3), clip=st.sampled_from([None, 0.1, 10.0]))
def test_any_parameter_count_and_mesh_size(sizes, n, steps, clip):
    g = torch.Generator().manual_seed(sum(sizes) + n)
    params = {f"p{i}": torch.randn(s, dtype=f64, generator=g) for i, s in enumerate(sizes)}
    batches = [torch.randn(7, dtype=f64, generator=g) for _ in range(steps)]

    def loss_fn(p: dict, x: torch.Tensor) -> torch.Tensor:
        total = sum((v.sin() * (i + 1)).sum() for i, v in enumerate(p.values()))
        return (x * total).square().mean()

    adam = optim.adamw(0.05, weight_decay=0.1)
    opt = adam if clip is None else optim.chain(optim.clip_by_global_norm(clip), adam)
    mesh = fdp.Mesh(n)
    out = []
    for shard in (False, True):
        step = fdp.data_parallel_step(loss_fn, opt, mesh, shard_optimizer_state=shard)
        state = fdp.TrainState.create(params, opt, mesh=mesh, shard_optimizer_state=shard)
        for x in batches:
            state, _ = step(state, x)
        out.append(state.params)
    assert_params_close(out[1], out[0])
    per_replica = sum(math.ceil(s / n) for s in sizes)
    assert per_replica * n - sum(sizes) < n * len(sizes)  # padding: under one element per slice


def _bn_dropout_training(mesh: fdp.Mesh, shard: bool) -> dict:
    """BatchNorm with buffer_policy="mean" and keyed dropout, one frozen parameter. (No bias
    before the BatchNorm: its gradient would be rounding noise, which Adam amplifies.)"""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5, bias=False), nn.BatchNorm1d(5), nn.Tanh(),
                        fdp.nn.Dropout(0.3), nn.Linear(5, 2)).double().train()
    net[4].bias.requires_grad_(False)
    model = fdp.functionalize(net)

    def loss_fn(params: dict, buffers: dict, batch: dict) -> Any:
        out, new_buffers = model.apply(params, buffers, batch["x"])
        return (out - batch["y"]).square().mean(), new_buffers

    opt = zero_optimizer("clip+adamw")
    step = fdp.data_parallel_step(loss_fn, opt, mesh, buffer_policy="mean",
                                  key=fdp.random.key(5), shard_optimizer_state=shard)
    state = fdp.TrainState.create(model.params, opt, buffers=model.buffers, mesh=mesh,
                                  shard_optimizer_state=shard)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        batch = {"x": torch.randn(12, 3, dtype=f64, generator=g),
                 "y": torch.randn(12, 2, dtype=f64, generator=g)}
        state, _ = step(state, batch)
    return {**state.params, **{f"buffer:{k}": v for k, v in state.buffers.items()}}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_buffer_policies_and_keys(mesh):
    m = MESHES[mesh]()
    assert_params_close(_bn_dropout_training(m, True), _bn_dropout_training(m, False))


def zero_checkpoint_run(mesh: fdp.Mesh, folder: Any, steps: int = 4) -> dict:
    """Two sharded steps, a checkpoint, then the same further steps from the live state and
    from the loaded one: ``{"name": file name, "params", "resumed", "opt_state"}``."""
    model = zero_model()

    def loss_fn(params: dict, batch: dict) -> Any:
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).square().mean()

    opt = zero_optimizer("clip+adamw")
    step = fdp.data_parallel_step(loss_fn, opt, mesh, shard_optimizer_state=True)

    def fresh() -> fdp.TrainState:
        return fdp.TrainState.create(model.params, opt, mesh=mesh, shard_optimizer_state=True)

    batches = zero_batches(steps)
    state = fresh()
    for batch in batches[:2]:
        state, _ = step(state, batch)
    path = fdp.save_checkpoint(folder, state, mesh=mesh)
    resumed = fdp.load_checkpoint(folder, like=fresh(), mesh=mesh)
    opt_state = resumed.opt_state
    for batch in batches[2:]:
        state, _ = step(state, batch)
        resumed, _ = step(resumed, batch)
    return {"name": path.name, "params": state.params, "resumed": resumed.params,
            "opt_state": opt_state}


def test_checkpoint_round_trip_continues_the_same_run(tmp_path):
    run = zero_checkpoint_run(fdp.Mesh(3), tmp_path)
    assert run["name"] == "state.pt"  # one process holds every slice: one file
    assert isinstance(run["opt_state"], fdp.ShardedOptState)
    for k in run["params"]:
        assert torch.equal(run["resumed"][k], run["params"][k])


def test_sum_over_shards_is_the_identity_outside_a_sharded_update():
    x = torch.tensor([1.0, 2.0])
    assert optim.sum_over_shards(x) is x
    assert float(optim.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})) == 5.0


def test_clear_errors():
    mesh = fdp.Mesh(2)
    params = {"w": torch.zeros(3, dtype=f64)}
    opt = optim.adam(0.1)
    with pytest.raises(ValueError, match=r"pass it: TrainState\.create"):
        fdp.TrainState.create(params, opt, shard_optimizer_state=True)
    with pytest.raises(TypeError, match="shard_optimizer_state must be a bool"):
        fdp.TrainState.create(params, opt, mesh=mesh, shard_optimizer_state="yes")
    with pytest.raises(TypeError, match="shard_optimizer_state must be a bool"):
        fdp.data_parallel_step(lambda p, b: p["w"].sum(), opt, mesh, shard_optimizer_state=1)

    def loss_fn(p: dict, b: torch.Tensor) -> torch.Tensor:
        return (p["w"] * b.sum()).sum()

    batch = torch.ones(4, dtype=f64)
    sharded = fdp.data_parallel_step(loss_fn, opt, mesh, shard_optimizer_state=True)
    plain = fdp.data_parallel_step(loss_fn, opt, mesh)
    with pytest.raises(TypeError, match="needs a sharded optimizer state"):
        sharded(fdp.TrainState.create(params, opt), batch)
    with pytest.raises(ValueError, match="shard_optimizer_state=True\\)"):
        plain(fdp.TrainState.create(params, opt, mesh=mesh, shard_optimizer_state=True), batch)
    other = fdp.TrainState.create(params, opt, mesh=fdp.Mesh(3), shard_optimizer_state=True)
    with pytest.raises(ValueError, match="split over 3 replicas but the mesh has 2"):
        sharded(other, batch)
