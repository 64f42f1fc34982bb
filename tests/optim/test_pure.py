"""Purity and transforms: no input is mutated, updates are deterministic, and the update runs
under torch.func.vmap, fdp.pmap and torch.compile with the eager numbers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

import fdp
import fdp.optim as optim
from tests.helpers import assert_close, assert_unchanged, snapshot
from tests.optim.trees import Shape, make, structures

f64 = torch.float64
schedule = optim.warmup_cosine_decay_schedule(0.01, 0.1, 2, 10)

# every configuration that allocates a different part of the state
OPTIMIZERS = {
    "sgd": optim.sgd(0.1),
    "sgd_momentum": optim.sgd(schedule, 0.9, nesterov=True, weight_decay=0.1),
    "adam": optim.adam(schedule, weight_decay=0.1, amsgrad=True),
    "adamw": optim.adamw(0.01),
    "rmsprop": optim.rmsprop(schedule, weight_decay=0.1, momentum=0.5, centered=True),
    "clip_adam": optim.chain(optim.clip_by_global_norm(0.5), optim.adam(0.1)),
}
names = st.sampled_from(sorted(OPTIMIZERS))


def _warm_state(opt: Any, params: Any, structure: Any, steps: int = 2) -> Any:
    state = opt.init(params)
    for _ in range(steps):
        _, state = opt.update(make(structure, f64), state, params)
    return state


@given(structure=structures, name=names)
def test_no_input_is_mutated(structure, name):
    opt = OPTIMIZERS[name]
    params = make(structure, f64)
    state = _warm_state(opt, params, structure)
    grads = make(structure, f64)
    before = [snapshot(t) for t in (params, grads, state)]
    updates, new_state = opt.update(grads, state, params)
    new_params = optim.apply_updates(params, updates)
    for b, t in zip(before, (params, grads, state), strict=True):
        assert_unchanged(b, t)
    # pure: the same inputs give the same outputs
    again_updates, again_state = opt.update(grads, state, params)
    assert_close(again_updates, updates, 0.0)
    assert_close(again_state, new_state, 0.0)
    # the outputs share no storage with the inputs
    inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((params, grads, state))}
    for out in pytree.tree_leaves((new_params, updates, new_state)):
        assert out.untyped_storage().data_ptr() not in inputs


@given(structure=structures, name=names)
def test_state_is_a_tree_of_tensors_with_int64_count(structure, name):
    opt = OPTIMIZERS[name]
    params = make(structure, torch.float32)
    state = opt.init(params)
    assert all(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(state))
    for s in state if isinstance(state, tuple) and not hasattr(state, "_fields") else (state,):
        if "count" in getattr(s, "_fields", ()):
            assert s.count.dtype == torch.int64 and s.count.shape == () and int(s.count) == 0
    _, new_state = opt.update(make(structure, torch.float32), state, params)
    assert pytree.tree_structure(new_state) == pytree.tree_structure(state)
    for a, b in zip(pytree.tree_leaves(new_state), pytree.tree_leaves(state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape


@given(structure=structures, name=names, n=st.integers(1, 4))
def test_vmap_and_pmap_equal_per_replica_updates(structure, name, n):
    """N replicas with different params, grads and states: vmap(update) == one update each."""
    opt = OPTIMIZERS[name]
    params = [make(structure, f64) for _ in range(n)]
    states = [_warm_state(opt, p, structure, steps=i % 3) for i, p in enumerate(params)]
    grads = [make(structure, f64) for _ in range(n)]
    expected = [opt.update(g, s, p) for g, s, p in zip(grads, states, params, strict=True)]
    stacked = [fdp.tree.stack(t) for t in (grads, states, params)]
    mapped = torch.func.vmap(opt.update)(*stacked)
    assert_close(mapped, fdp.tree.stack(expected), 1e-15)
    pmapped = fdp.pmap(opt.update, fdp.Mesh(n))(*stacked)
    assert_close(pmapped, fdp.tree.stack(expected), 1e-15)


def test_compiled_update_equals_eager():
    """The whole update (clip, Adam with amsgrad, decay and a schedule) traces in one graph."""
    torch._dynamo.reset()
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adam(schedule, weight_decay=0.1, amsgrad=True))
    structure = {"w": Shape((3, 4)), "b": (Shape((5,)),)}
    params = make(structure, f64)
    state = opt.init(params)
    compiled = torch.compile(opt.update, fullgraph=True)
    eager_params, eager_state = params, state
    for _ in range(4):
        grads = make(structure, f64, 3.0)
        updates, state = compiled(grads, state, params)
        params = optim.apply_updates(params, updates)
        e_updates, eager_state = opt.update(grads, eager_state, eager_params)
        eager_params = optim.apply_updates(eager_params, e_updates)
    assert_close(params, eager_params, 1e-12)
    assert_close(state, eager_state, 1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_key_order_of_grads_does_not_matter(name):
    """Trees are matched by key path: grads whose dict keys were inserted in another order."""
    opt = OPTIMIZERS[name]
    params = {"a": torch.randn(2, dtype=f64), "b": {"c": torch.randn(3, dtype=f64)}}
    grads = {"a": torch.randn(2, dtype=f64), "b": {"c": torch.randn(3, dtype=f64)}}
    shuffled = {"b": grads["b"], "a": grads["a"]}
    state = opt.init(params)
    u1, s1 = opt.update(grads, state, params)
    u2, s2 = opt.update(shuffled, state, params)
    assert_close(u2, u1, 0.0)
    assert_close(optim.apply_updates(params, u2), optim.apply_updates(params, u1), 0.0)
    assert_close(s2, s1, 0.0)


def test_apply_updates_keeps_dtype():
    params = {"w": torch.ones(2, dtype=torch.float32), "h": torch.ones(2, dtype=torch.bfloat16)}
    updates = {"w": torch.full((2,), 0.5, dtype=f64), "h": torch.full((2,), 0.5, dtype=f64)}
    out = optim.apply_updates(params, updates)
    assert out["w"].dtype == torch.float32 and out["h"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.full((2,), 1.5))
