"""fdp.Mesh(n, executor="replay"): the traced-and-replayed step equals the eager one bitwise,
traces again whenever its inputs' signature changes, and refuses what it cannot replay."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.nn

_MESHES: dict[tuple[int, str], fdp.Mesh] = {}


def _mesh(n: int, executor: str = "replay") -> fdp.Mesh:
    """One mesh per size: its cache of graphs is shared, as in a training loop."""
    if (n, executor) not in _MESHES:
        _MESHES[n, executor] = fdp.Mesh(n, executor=executor)
    return _MESHES[n, executor]


def _graphs(mesh: fdp.Mesh) -> int:
    return mesh.backend.replay_graphs


def _net(kind: str, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).to(dtype)


def _batch(kind: str, rows: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    shape = (rows, 6) if kind == "mlp" else (rows, 1, 4, 4)
    return {"x": torch.randn(*shape, dtype=dtype), "y": torch.randint(0, 3, (rows,))}


def _loss(model: fdp.Model, has_aux: bool = False):
    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        loss = nn.functional.cross_entropy(out, batch["y"])
        return (loss, {"top": out.max()}) if has_aux else loss
    return loss_fn


def _split_loss(model: fdp.Model, has_aux: bool):
    def forward(params, batch):
        return model.apply(params, model.buffers, batch["x"])[0]

    def criterion(out, batch):
        loss = nn.functional.cross_entropy(out, batch["y"])
        return (loss, out.max()) if has_aux else loss
    return fdp.split_loss(forward, criterion)


def _assert_equal(actual, expected) -> None:
    """Bitwise: the same kernels on the same inputs."""
    a, b = fdp.tree.leaves_with_path(actual), fdp.tree.leaves_with_path(expected)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=True):
        if isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and x.dtype == y.dtype, path
            assert torch.equal(x, y), f"{path}: {(x - y).abs().max().item():.3e}"
            assert not x.requires_grad, path
        else:
            assert x == y, path


@given(kind=st.sampled_from(["mlp", "cnn"]), n=st.integers(1, 5), rows=st.integers(1, 12),
       split=st.sampled_from(["chunk", "even"]), strategy=st.sampled_from(["weighted", "gather"]),
       has_aux=st.booleans(), seed=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=8)
def test_replay_equals_the_eager_step_bitwise(kind, n, rows, split, strategy, has_aux, seed,
                                              dtype):
    model = fdp.functionalize(_net(kind, seed, dtype))
    loss = _split_loss(model, has_aux) if strategy == "gather" else _loss(model, has_aux)
    options = dict(has_aux=has_aux, split=split, strategy=strategy)
    replay = fdp.value_and_grad(loss, _mesh(n), **options)
    eager = fdp.value_and_grad(loss, _mesh(n, "auto"), **options)
    for step in range(2):  # the first call traces, then both replay
        batch = _batch(kind, rows, dtype)
        params = {k: v + step for k, v in model.params.items()}
        _assert_equal(replay(params, batch), eager(params, batch))


@given(n=st.integers(1, 4), extra=st.integers(0, 5),
       policy=st.sampled_from(["replica0", "mean"]), seed=st.integers(0, 5))
@settings(max_examples=5)
def test_buffers_replay_bitwise(n, extra, policy, seed):
    rows = 2 * n + extra  # split "even": at least 2 rows per replica for BatchNorm
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model = fdp.functionalize(net.double().train())

    def loss_fn(params, buffers, batch):
        out, new_buffers = model.apply(params, buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean(), new_buffers

    batch = {"x": torch.randn(rows, 3, dtype=torch.float64),
             "y": torch.randn(rows, 2, dtype=torch.float64)}
    got = fdp.value_and_grad(loss_fn, _mesh(n), buffer_policy=policy, split="even")(
        model.params, model.buffers, batch)
    want = fdp.value_and_grad(loss_fn, _mesh(n, "auto"), buffer_policy=policy, split="even")(
        model.params, model.buffers, batch)
    _assert_equal(got, want)


def _dropout_model() -> fdp.Model:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    return fdp.functionalize(fdp.nn.convert_dropout(net.double()))


def test_keyed_randomness_replays_exactly_and_the_key_is_an_input():
    model = _dropout_model()

    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch)[0].pow(2).mean()

    batch = torch.randn(7, 4, dtype=torch.float64)
    replay = fdp.value_and_grad(loss_fn, _mesh(3))
    eager = fdp.value_and_grad(loss_fn, _mesh(3, "auto"))
    results = []
    for seed in (1, 2):
        key = fdp.random.key(seed)
        results.append(replay(model.params, batch, key=key))
        _assert_equal(results[-1], eager(model.params, batch, key=key))
    assert not torch.equal(results[0][0], results[1][0])  # not baked into the graph


def test_torch_random_ops_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double()
    model = fdp.functionalize(net)

    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch)[0].sum()

    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(2, executor="replay"), randomness="different")
    for _ in range(2):  # refused again from the cache
        with pytest.raises(ValueError, match=r"random generators.*fdp\.random\.key"):
            vg(model.params, torch.randn(4, 4, dtype=torch.float64))


def test_a_loss_that_reads_values_runs_eagerly_with_one_warning():
    model = fdp.functionalize(_net("mlp", 0))

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        loss = nn.functional.cross_entropy(out, batch["y"])
        return loss * 2 if out.sum() > 0 else loss  # a branch on a value: not traceable

    mesh = fdp.Mesh(2, executor="replay")
    vg = fdp.value_and_grad(loss_fn, mesh)
    # vmap cannot run it either: the eager step is the general executor's (its own warning)
    eager = fdp.value_and_grad(loss_fn, fdp.Mesh(2, executor="general"))
    batch = _batch("mlp", 6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = vg(model.params, batch)
    assert any(w.category is fdp.FallbackWarning and "cannot be traced for replay"
               in str(w.message) and w.filename == __file__ for w in seen), seen
    _assert_equal(got, eager(model.params, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_equal(vg(model.params, batch), eager(model.params, batch))


def test_the_cache_traces_again_for_each_new_signature_and_only_then():
    model = fdp.functionalize(_net("mlp", 1))
    mesh = fdp.Mesh(3, executor="replay")
    vg = fdp.value_and_grad(_loss(model), mesh)
    eager = fdp.value_and_grad(_loss(model), _mesh(3, "auto"))
    params = model.params

    def check(p, batch, graphs):
        _assert_equal(vg(p, batch), eager(p, batch))
        assert _graphs(mesh) == graphs

    check(params, _batch("mlp", 6), 1)
    check(params, _batch("mlp", 6), 1)  # new values, same signature
    check(params, _batch("mlp", 7), 2)  # new batch size (and split)
    check({k: v.float() for k, v in params.items()},
          {"x": torch.randn(6, 6), "y": torch.randint(0, 3, (6,))}, 3)  # new dtype
    check(params, {**_batch("mlp", 6), "w": torch.ones(6)}, 4)  # new structure
    x = _batch("mlp", 6)
    check(params, {"x": x["x"].t().contiguous().t(), "y": x["y"]}, 5)  # new strides
    fdp.value_and_grad(_loss(model, True), mesh, has_aux=True)(params, x)  # new loss
    assert _graphs(mesh) == 6


def test_parameters_that_require_grad_run_eagerly_and_stay_differentiable():
    model = fdp.functionalize(_net("mlp", 2))
    params = {k: v.clone().requires_grad_() for k, v in model.params.items()}
    batch = _batch("mlp", 5)
    mesh = fdp.Mesh(2, executor="replay")
    loss, grads = fdp.value_and_grad(_loss(model), mesh)(params, batch)
    assert _graphs(mesh) == 0
    want = fdp.value_and_grad(_loss(model), _mesh(2, "auto"))(params, batch)
    _assert_equal((loss.detach(), {k: g.detach() for k, g in grads.items()}),
                  (want[0].detach(), {k: g.detach() for k, g in want[1].items()}))
    assert loss.requires_grad


def test_unused_parameters_and_closure_tensors_updated_in_place():
    model = fdp.functionalize(_net("mlp", 3))
    scale = torch.ones((), dtype=torch.float64)

    def loss_fn(params, batch):
        used = {k: v for k, v in params.items() if k != "spare"}
        return _loss(model)(used, batch) * scale

    params = {**model.params, "spare": torch.zeros(2, dtype=torch.float64)}
    batch = _batch("mlp", 6)
    replay = fdp.value_and_grad(loss_fn, _mesh(2), unused="none")
    eager = fdp.value_and_grad(loss_fn, _mesh(2, "auto"), unused="none")
    got = replay(params, batch)
    assert got[1]["spare"] is None
    _assert_equal(got, eager(params, batch))
    scale.fill_(3.0)  # the graph holds the tensor itself, so it sees in-place updates
    _assert_equal(replay(params, batch), eager(params, batch))


def test_data_parallel_step_on_a_replay_mesh_equals_the_eager_mesh():
    model = fdp.functionalize(_net("mlp", 4))
    optimizer = fdp.optim.sgd(0.1, momentum=0.9)
    states = {}
    for executor in ("replay", "auto"):
        step = fdp.data_parallel_step(_loss(model), optimizer, fdp.Mesh(3, executor=executor))
        state = fdp.TrainState.create(model.params, optimizer)
        torch.manual_seed(0)
        for _ in range(3):
            state, _ = step(state, _batch("mlp", 8))
        states[executor] = state.params
    _assert_equal(states["replay"], states["auto"])


def test_the_option_is_named_in_the_mesh_and_checked():
    assert "executor='replay'" in repr(fdp.Mesh(2, executor="replay"))
    assert fdp.Mesh(2, executor="replay") != fdp.Mesh(2)
    with pytest.raises(ValueError, match="executor"):
        fdp.Mesh(devices=["cpu"], executor="replay")


def test_microbatches_with_a_key_replay_exactly():
    model = _dropout_model()

    def loss_fn(params, batch):
        return model.apply(params, model.buffers, batch)[0].pow(2).mean()

    optimizer = fdp.optim.sgd(0.1)
    params = {}
    for executor in ("replay", "auto"):
        mesh = fdp.Mesh(2, executor=executor)
        step = fdp.data_parallel_step(loss_fn, optimizer, mesh, microbatches=2,
                                      key=fdp.random.key(3))
        state = fdp.TrainState.create(model.params, optimizer)
        torch.manual_seed(0)
        for _ in range(2):
            state, _ = step(state, torch.randn(8, 4, dtype=torch.float64))
        params[executor] = state.params
    _assert_equal(params["replay"], params["auto"])
    assert mesh.backend.replay_graphs == 0 and fdp.Mesh(2, executor="replay").backend \
        .replay_graphs == 0


def test_under_torch_compile_the_step_runs_as_traced_by_dynamo():
    model = fdp.functionalize(_net("mlp", 5))
    mesh = fdp.Mesh(2, executor="replay")
    vg = fdp.value_and_grad(_loss(model), mesh)
    batch = _batch("mlp", 6)
    got = torch.compile(vg, backend="eager")(model.params, batch)
    want = fdp.value_and_grad(_loss(model), _mesh(2, "auto"))(model.params, batch)
    assert mesh.backend.replay_graphs == 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def _traced_example() -> tuple:
    from fdp.backends._replay_graph import trace

    w = torch.randn(5, 4, dtype=torch.float64)

    def fn(x: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(x @ w.t() + b).view(3, 2, 5)
        scaled = torch.ops.aten.mul.Scalar(h, 3)  # torch.mul would dispatch mul.Tensor
        return [(h * 2).sum(dim=(0, 1)), torch.log_softmax(scaled, -1)]

    x, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    return trace(fn, [x, b]), [x, b]


def test_bound_ops_compute_bitwise_what_the_recorded_aten_ops_compute():
    from fdp.backends._replay_bind import bind_fast

    graph, inputs = _traced_example()
    recorded = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    want = graph(*inputs)
    assert bind_fast(graph) > 0
    bound = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert any(not isinstance(t, torch._ops.OpOverload) for t in bound)
    # no binding dispatches mul.Scalar: it stays as recorded
    assert torch.ops.aten.mul.Scalar in recorded and torch.ops.aten.mul.Scalar in bound
    for got, ref in zip(graph(*inputs), want, strict=True):
        assert torch.equal(got, ref)
