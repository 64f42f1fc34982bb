"""data_parallel_step(donate=...): in-place steps equal the functional step bitwise; "auto"
stays pure; "state" invalidates the donated state; the fallbacks and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from fdp._compat import pytree
from fdp.optim import GradientTransformation, _into
from fdp.optim._native import fully_native

MODES = ("auto", "state")


@pytest.fixture(autouse=True, scope="module")
def _small_leaves_too():
    """Recycled storage and scratch for leaves of any size (by default only from
    ``fdp.optim._into.BIG`` elements), so that the small tensors here take the in-place
    paths."""
    saved = _into.BIG
    _into.BIG = 1
    yield
    _into.BIG = saved


def _keep(opt: GradientTransformation) -> GradientTransformation:
    """A user's transformation that keeps the grads and params it is given in its state and
    returns one of them as its update (so its update aliases its state)."""

    def init(params):
        return {"grads": {k: torch.zeros_like(v) for k, v in params.items()},
                "params": dict(params)}

    def update(grads, state, params=None):
        kept = {k: state["grads"][k] if g is None else g for k, g in grads.items()}
        updates, _ = opt.update(grads, opt.init(params), params)
        return updates, {"grads": kept, "params": dict(params)}

    return GradientTransformation(init, update)


def _echo():
    """A user's transformation whose update is (the same object as) its input."""
    return GradientTransformation(lambda p: {}, lambda g, s, p=None: (g, s))


OPTIMIZERS = {
    "sgd": lambda: fdp.optim.sgd(0.1),
    "sgd-momentum": lambda: fdp.optim.sgd(0.1, momentum=0.9, dampening=0.3, weight_decay=0.1),
    "sgd-nesterov": lambda: fdp.optim.sgd(fdp.optim.step_schedule(0.1, 2), momentum=0.9,
                                          nesterov=True, weight_decay=0.05),
    "adam": lambda: fdp.optim.adam(1e-2, weight_decay=0.1),
    "adam-amsgrad": lambda: fdp.optim.adam(1e-2, amsgrad=True),
    "adamw-amsgrad": lambda: fdp.optim.adamw(fdp.optim.cosine_decay_schedule(1e-2, 4),
                                             weight_decay=0.3, amsgrad=True),
    "rmsprop": lambda: fdp.optim.rmsprop(1e-2, weight_decay=0.1),
    "rmsprop-centered-momentum": lambda: fdp.optim.rmsprop(
        fdp.optim.linear_schedule(1e-2, 1e-3, 3), centered=True, momentum=0.5),
    "clip-adam": lambda: fdp.optim.chain(fdp.optim.clip_by_global_norm(0.05),
                                         fdp.optim.adam(1e-2)),
    "clip-sgd-clip": lambda: fdp.optim.chain(fdp.optim.clip_by_global_norm(0.5),
                                             fdp.optim.sgd(0.1, momentum=0.5),
                                             fdp.optim.clip_by_global_norm(0.01)),
    "nested-chain": lambda: fdp.optim.chain(fdp.optim.chain(fdp.optim.clip_by_global_norm(1.0)),
                                            fdp.optim.rmsprop(1e-2, momentum=0.3)),
    "user-then-sgd": lambda: fdp.optim.chain(_keep(fdp.optim.sgd(1.0)),
                                             fdp.optim.sgd(0.1, momentum=0.9)),
    "adam-then-user": lambda: fdp.optim.chain(fdp.optim.adam(1e-2, weight_decay=0.1),
                                              _keep(fdp.optim.sgd(0.5))),
    "echo-between": lambda: fdp.optim.chain(fdp.optim.clip_by_global_norm(0.1), _echo(),
                                            fdp.optim.sgd(0.1, weight_decay=0.1)),
    "user-alone": lambda: _keep(fdp.optim.sgd(0.1)),
}


def _problem(sizes: list[int], used: list[bool], dtype: torch.dtype):
    """Params of odd sizes; the loss uses only the ``used`` ones (the rest get no gradient)."""
    params = {f"p{i}": torch.randn(n, dtype=dtype) for i, n in enumerate(sizes)}
    width = sum(n for n, u in zip(sizes, used, strict=True) if u)
    keys = [k for k, u in zip(params, used, strict=True) if u]

    def loss_fn(p, batch):
        flat = torch.cat([p[k] for k in keys])
        return torch.tanh(batch @ flat).square().mean() + (flat ** 3).sum() * 1e-3

    return params, loss_fn, width


def _leaves(state):
    return [x for x in pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]


def _assert_bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), (x, y)


def _run(loss_fn, optimizer, params, batches, donate, keep=False, **options):
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate=donate, **options)
    state = fdp.TrainState.create(params, optimizer)
    first, kept = state, []
    for batch in batches:
        state, _ = step(state, batch)
        if keep:
            kept.append((state, [x.clone() for x in _leaves(state)]))
    if donate == "state" and fully_native(optimizer.update):  # it did write in place
        assert all(state.params[k].data_ptr() == first.params[k].data_ptr() for k in params)
    return state, kept


sizes = st.lists(st.integers(1, 37), min_size=1, max_size=4)


@given(sizes=sizes, data=st.data(), opt=st.sampled_from(sorted(OPTIMIZERS)),
       dtype=st.sampled_from([torch.float32, torch.float64]), steps=st.integers(1, 4))
def test_donated_steps_equal_the_functional_step_bitwise(sizes, data, opt, dtype, steps):
    used = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)).filter(
        any))
    params, loss_fn, width = _problem(sizes, used, dtype)
    batches = [torch.randn(5, width, dtype=dtype) for _ in range(steps)]
    want, _ = _run(loss_fn, OPTIMIZERS[opt](), params, batches, "none")
    for donate in MODES:
        got, _ = _run(loss_fn, OPTIMIZERS[opt](), params, batches, donate)
        _assert_bitwise(got, want)


@given(sizes=sizes, opt=st.sampled_from(sorted(OPTIMIZERS)), steps=st.integers(2, 5))
def test_auto_leaves_every_returned_state_as_it_was(sizes, opt, steps):
    params, loss_fn, width = _problem(sizes, [True] * len(sizes), torch.float64)
    batches = [torch.randn(4, width, dtype=torch.float64) for _ in range(steps)]
    got, kept = _run(loss_fn, OPTIMIZERS[opt](), params, batches, "auto", keep=True)
    want, _ = _run(loss_fn, OPTIMIZERS[opt](), params, batches, "none")
    _assert_bitwise(got, want)
    for state, values in kept:  # states kept by the caller are never overwritten
        for x, v in zip(_leaves(state), values, strict=True):
            assert torch.equal(x, v)


def test_auto_recycles_the_storage_of_dead_states():
    params, loss_fn, width = _problem([300, 7], [True, True], torch.float32)
    step = fdp.data_parallel_step(loss_fn, fdp.optim.adam(1e-3), fdp.Mesh(2))
    state = fdp.TrainState.create(params, fdp.optim.adam(1e-3))
    batch = torch.randn(4, width)
    seen = []
    for _ in range(6):
        state, _ = step(state, batch)
        seen.append(state.params["p0"].data_ptr())
    assert len(set(seen[2:])) == 2, seen  # two buffers take turns in steady state
    assert seen[2] == seen[4] and seen[3] == seen[5]
    kept = state
    state, _ = step(state, batch)
    state, _ = step(state, batch)  # `kept` is alive: the step may not write into it
    assert state.params["p0"].data_ptr() != kept.params["p0"].data_ptr()


def test_auto_recycles_only_leaves_big_enough_to_fault_pages(monkeypatch):
    monkeypatch.setattr(_into, "BIG", 1 << 15)
    params, loss_fn, width = _problem([1 << 15, 9], [True, True], torch.float32)
    step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.1, momentum=0.9), fdp.Mesh(2))
    state = fdp.TrainState.create(params, fdp.optim.sgd(0.1, momentum=0.9))
    batch = torch.randn(2, width)
    seen = []
    for _ in range(5):
        state, _ = step(state, batch)
        seen.append((state.params["p0"].data_ptr(), state.opt_state.momentum_buffer["p0"]
                     .data_ptr()))
    assert seen[2] == seen[4] and seen[1] == seen[3] and seen[3] != seen[4]
    assert state.params["p1"].untyped_storage().nbytes() == 9 * 4  # its own, fresh


def test_auto_does_not_recycle_storage_a_view_or_an_export_still_uses():
    params, loss_fn, width = _problem([64], [True], torch.float32)
    step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.1), fdp.Mesh(2))
    state = fdp.TrainState.create(params, fdp.optim.sgd(0.1))
    batch = torch.randn(4, width)
    state, _ = step(state, batch)
    view = state.params["p0"][3:9]
    array = state.params["p0"][10:20].numpy()
    before = (view.clone(), array.copy())
    state, _ = step(state, batch)
    storage = state.params["p0"].untyped_storage()
    kept = torch.empty(0).set_(storage).clone()
    for _ in range(4):
        state, _ = step(state, batch)
    assert torch.equal(view, before[0]) and (array == before[1]).all()
    assert torch.equal(torch.empty(0).set_(storage), kept)


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam", "user-then-sgd"])
def test_state_donation_invalidates_the_old_state(opt, tmp_path):
    params, loss_fn, width = _problem([5, 3], [True, True], torch.float64)
    optimizer = OPTIMIZERS[opt]()
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="state")
    old = fdp.TrainState.create(params, optimizer)
    batch = torch.randn(4, width, dtype=torch.float64)
    new, _ = step(old, batch)
    with pytest.raises(ValueError, match=r"step: state\.params\['p0'\] was donated"):
        step(old, batch)
    with pytest.raises(ValueError, match=r"value_and_grad: params\['p0'\] was donated"):
        fdp.value_and_grad(loss_fn, fdp.Mesh(2))(old.params, batch)
    with pytest.raises(ValueError, match=r"apply_updates: params\['p1'\] was donated"):
        fdp.optim.apply_updates({"p1": old.params["p1"]}, {"p1": torch.zeros(3)})
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    with pytest.raises(ValueError, match="donated"):
        optimizer.update(grads, old.opt_state, new.params)
    with pytest.raises(ValueError, match=r"save_checkpoint: state\.params\['p0'\] was "):
        fdp.save_checkpoint(tmp_path, old)
    newer, _ = step(new, batch)  # the returned state is valid, and donated in its turn
    with pytest.raises(ValueError, match="use the state that step returned"):
        step(new, batch)
    fdp.save_checkpoint(tmp_path, newer)


def test_state_donation_writes_into_the_donated_tensors():
    params, loss_fn, width = _problem([6], [True], torch.float32)
    step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.1, momentum=0.9), fdp.Mesh(2),
                                  donate="state")
    old = fdp.TrainState.create(params, fdp.optim.sgd(0.1, momentum=0.9))
    new, _ = step(old, torch.randn(4, width))
    assert new.params["p0"] is not old.params["p0"]
    assert new.params["p0"].data_ptr() == old.params["p0"].data_ptr()
    assert torch.equal(old.params["p0"], new.params["p0"])  # reading shows the new values
    assert not torch.equal(new.params["p0"], params["p0"])


def test_state_donation_of_a_user_transformation_leaves_what_it_kept():
    params, loss_fn, width = _problem([4], [True], torch.float64)
    optimizer = OPTIMIZERS["user-then-sgd"]()
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="state")
    state = fdp.TrainState.create(params, optimizer)
    first = state.params["p0"].clone()
    state, _ = step(state, torch.randn(4, width, dtype=torch.float64))
    assert torch.equal(state.opt_state[0]["params"]["p0"], first)  # params not overwritten


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
        self.unused = nn.Linear(2, 2)  # gets no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("options", [
    {"microbatches": 2}, {"has_aux": True}, {"buffer_policy": "mean"},
    {"unused": "zeros"}, {"reduction": "sum", "split": "even"},
])
@pytest.mark.parametrize("donate", MODES)
def test_step_options_with_donation(options, donate):
    module = _Net()
    if "buffer_policy" not in options:
        module.eval()  # BatchNorm reads its running statistics
    model = fdp.functionalize(module)

    def apply(params, buffers, batch):
        out, new_buffers = model.apply(params, buffers, batch["x"])
        loss = ((out - batch["y"]) ** 2).mean()
        return ((loss, out.sum()) if options.get("has_aux") else loss), new_buffers

    if "buffer_policy" in options:
        loss_fn = apply
    else:
        def loss_fn(params, batch):
            return apply(params, model.buffers, batch)[0]

    optimizer = fdp.optim.adamw(1e-2, amsgrad=True)
    batches = [{"x": torch.randn(8, 5), "y": torch.randn(8, 3)} for _ in range(3)]
    results = {}
    for d in ("none", donate):
        step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(3), donate=d, **options)
        state = fdp.TrainState.create(model.params, optimizer, buffers=model.buffers)
        for b in batches:
            state, metrics = step(state, b)
        results[d] = (state, metrics)
    _assert_bitwise(results[donate], results["none"])


def test_auto_falls_back_where_storage_is_shared_and_state_refuses():
    shared = torch.randn(6, dtype=torch.float64)
    params = {"a": shared, "b": shared}

    def loss_fn(p, batch):
        return (batch @ (p["a"] * p["b"])).square().mean()

    batch = torch.randn(4, 6, dtype=torch.float64)
    optimizer = fdp.optim.sgd(0.1, momentum=0.9)
    hand_made = fdp.TrainState.create(params, optimizer)._replace(params=params)
    want, _ = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="none")(
        hand_made, batch)
    got, _ = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2))(hand_made, batch)
    _assert_bitwise(got, want)
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="state")
    with pytest.raises(ValueError, match=r"state\.params\['a'\] and state\.params\['b'\] "
                                         r"share memory.*donate='auto'"):
        step(hand_made, batch)


def test_params_that_require_grad_are_updated_functionally():
    params, loss_fn, width = _problem([5], [True], torch.float64)
    optimizer = fdp.optim.sgd(0.1)
    state = fdp.TrainState.create(params, optimizer)
    state = state._replace(params={"p0": state.params["p0"].requires_grad_()})
    batch = torch.randn(4, width, dtype=torch.float64)
    want, _ = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="none")(state,
                                                                                     batch)
    got, _ = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2))(state, batch)
    assert got.params["p0"].grad_fn is not None  # differentiable, as the functional step
    _assert_bitwise(got, want)
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="state")
    with pytest.raises(ValueError, match="requires grad"):
        step(state, batch)


@pytest.mark.parametrize("donate", MODES)
def test_compiled_steps_are_functional(donate):
    params, loss_fn, width = _problem([5, 3], [True, True], torch.float32)
    optimizer = fdp.optim.adam(1e-2)
    batch = torch.randn(4, width)
    state = fdp.TrainState.create(params, optimizer)
    before = [x.clone() for x in _leaves(state)]
    want, _ = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate="none")(state,
                                                                                     batch)
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate=donate,
                                  unused="zeros")
    got, _ = torch.compile(step, fullgraph=True)(state, batch)
    assert all(torch.allclose(x, y) for x, y in zip(_leaves(got), _leaves(want), strict=True))
    # traced, the update is functional in every mode: the input state is left as it was
    assert all(torch.equal(x, y) for x, y in zip(_leaves(state), before, strict=True))
    step(state, batch)  # and it was not donated


def test_sharded_optimizer_state_with_donation():
    params, loss_fn, width = _problem([5, 3], [True, True], torch.float64)
    optimizer, mesh = fdp.optim.adam(1e-2), fdp.Mesh(2)
    batch = torch.randn(4, width, dtype=torch.float64)
    state = fdp.TrainState.create(params, optimizer, mesh=mesh, shard_optimizer_state=True)
    runs = {d: fdp.data_parallel_step(loss_fn, optimizer, mesh, shard_optimizer_state=True,
                                      donate=d)(state, batch)[0] for d in ("auto", "none")}
    _assert_bitwise(runs["auto"], runs["none"])
    with pytest.raises(ValueError, match="donate='state' does not combine with "
                                         "shard_optimizer_state"):
        fdp.data_parallel_step(loss_fn, optimizer, mesh, shard_optimizer_state=True,
                               donate="state")


@pytest.mark.parametrize(("donate", "error"), [(True, TypeError), (None, TypeError),
                                               ("inplace", ValueError), ("", ValueError)])
def test_bad_donate_values_name_the_argument(donate, error):
    message = ("data_parallel_step: donate must be one of" if error is TypeError
               else "data_parallel_step: unknown donate=.*; use one of .*'auto'")
    with pytest.raises(error, match=message):
        fdp.data_parallel_step(lambda p, b: b, fdp.optim.sgd(0.1), fdp.Mesh(2), donate=donate)


def test_functional_optimizer_api_is_unchanged_by_donation():
    """A user's own loop (no step) stays functional: update and apply_updates allocate."""
    params = {"w": torch.randn(5)}
    opt = fdp.optim.adam(0.1)
    state = opt.init(params)
    before = [x.clone() for x in _leaves((params, state))]
    updates, new_state = opt.update({"w": torch.ones(5)}, state, params)
    fdp.optim.apply_updates(params, updates)
    assert all(torch.equal(x, y) for x, y in zip(_leaves((params, state)), before, strict=True))
    assert math.isfinite(float(new_state.mu["w"].sum()))


def test_steps_under_torch_func_transforms_are_functional():
    params, loss_fn, width = _problem([5, 3], [True, True], torch.float64)
    optimizer = fdp.optim.sgd(0.1, momentum=0.9)
    state = fdp.TrainState.create(params, optimizer)
    batch = torch.randn(4, width, dtype=torch.float64)

    def after_step(scale, donate):
        step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(2), donate=donate)
        scaled = state._replace(params={k: v * scale for k, v in state.params.items()})
        return step(scaled, batch)[0].params["p0"].sum()

    one = torch.tensor(1.0, dtype=torch.float64)
    want = torch.func.grad(after_step)(one, "none")
    assert torch.equal(torch.func.grad(after_step)(one, "auto"), want)
    with pytest.raises(ValueError, match=r"donate='state' cannot update in place: a torch\.func"):
        torch.func.grad(after_step)(one, "state")
