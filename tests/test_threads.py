"""The threads backend: one replica per device in its own thread, same results as vmap."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from tests.helpers import F32_REL, F64_REL, assert_close, assert_unchanged, snapshot

_MESHES: dict[int, fdp.Mesh] = {}


def threads_mesh(n: int) -> fdp.Mesh:
    """One mesh per size for the whole module: its worker threads are reused."""
    if n not in _MESHES:
        _MESHES[n] = fdp.Mesh(devices=["cpu"] * n, timeout=30)
    return _MESHES[n]


def _mlp(seed: int) -> fdp.Model:
    torch.manual_seed(seed)
    return fdp.functionalize(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double())


def _batch(rows: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(rows, 3, dtype=torch.float64),
            "y": torch.randn(rows, 2, dtype=torch.float64)}


def _loss(model: fdp.Model):
    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean()
    return loss_fn


splits = st.sampled_from(["chunk", "even"])


@given(n=st.integers(1, 4), rows=st.integers(1, 12), split=splits, seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_value_and_grad_equals_vmap_and_single_device(n, rows, split, seed, dtype):
    rel = F64_REL if dtype == torch.float64 else F32_REL
    model = _mlp(seed)
    model = model._replace(params={k: v.to(dtype) for k, v in model.params.items()})
    batch = {k: v.to(dtype) for k, v in _batch(rows).items()}
    loss_fn = _loss(model)
    ref = torch.func.grad_and_value(loss_fn)(model.params, batch)
    for mesh in (threads_mesh(n), fdp.Mesh(n)):
        loss, grads = fdp.value_and_grad(loss_fn, mesh, split=split)(model.params, batch)
        assert_close(loss, ref[1], rel)
        assert_close(grads, ref[0], rel)


@given(n=st.integers(1, 4), rows=st.integers(1, 12), seed=st.integers(0, 99))
def test_gather_strategy_on_threads(n, rows, seed):
    model, batch = _mlp(seed), _batch(rows)

    def forward(params, b):
        return model.apply(params, model.buffers, b["x"])[0]

    def criterion(out, b):
        return (out - b["y"]).pow(2).sum() / out.shape[0] ** 0.5  # not a per-example mean

    loss_fn = fdp.split_loss(forward, criterion)
    ref_grads, ref_loss = torch.func.grad_and_value(loss_fn)(model.params, batch)
    loss, grads = fdp.value_and_grad(loss_fn, threads_mesh(n), strategy="gather")(
        model.params, batch)
    assert_close(loss, ref_loss, F64_REL)
    assert_close(grads, ref_grads, F64_REL)


@given(n=st.integers(1, 4), rows=st.integers(1, 10), k=st.integers(1, 3), seed=st.integers(0, 9))
def test_training_steps_equal_across_backends(n, rows, k, seed):
    model = _mlp(seed)
    optimizer = fdp.optim.adam(1e-2)
    batches = [_batch(rows) for _ in range(k)]
    states = []
    for mesh in (threads_mesh(n), fdp.Mesh(n), fdp.Mesh(1)):
        step = fdp.data_parallel_step(_loss(model), optimizer, mesh)
        state = fdp.TrainState.create(model.params, optimizer)
        for b in batches:
            state, _ = step(state, b)
        states.append(state.params)
    assert_close(states[0], states[2], F64_REL)
    assert_close(states[1], states[2], F64_REL)


@given(n=st.integers(1, 4), rows=st.integers(1, 9), split=splits)
def test_collectives_agree_with_vmap(n, rows, split):
    x = torch.randn(rows, 3, dtype=torch.float64)

    def body(v):
        s = v.sum(0)
        return {"sum": fdp.psum(s, "dp"), "mean": fdp.pmean(s, "dp"), "max": fdp.pmax(s, "dp"),
                "min": fdp.pmin(s, "dp"), "gather": fdp.all_gather(s, "dp"),
                "index": fdp.axis_index("dp"), "size": torch.tensor(fdp.axis_size("dp"))}

    results = []
    for mesh in (threads_mesh(n), fdp.Mesh(n)):
        out = fdp.pmap(body, mesh)(fdp.scatter(x, mesh, split=split))
        results.append(out.data)
    assert_close(results[0], results[1], F64_REL)


@given(n=st.integers(1, 4), rows=st.integers(1, 9))
def test_gradients_flow_through_pmap_and_collectives(n, rows):
    """Tape autograd through the per-device copies, the threads and psum's transpose."""
    mesh = threads_mesh(n)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(rows, 3, dtype=torch.float64)

    def body(w_, v):
        return fdp.psum((v @ w_).pow(2).sum(), "dp") * (v @ w_).sum()

    out = fdp.pmap(body, mesh, in_axes=(None, 0), out_axes=0)(w, fdp.scatter(x, mesh))
    (g,) = torch.autograd.grad(out.data.sum(), [w])
    wv = fdp.Mesh(n)
    w2 = w.detach().clone().requires_grad_()
    out2 = fdp.pmap(body, wv, in_axes=(None, 0))(w2, fdp.scatter(x, wv))
    (g2,) = torch.autograd.grad(out2.data.sum(), [w2])
    assert_close(g, g2, F64_REL)


def test_buffer_policies_match_vmap():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double().train()
    model = fdp.functionalize(net)

    def loss_fn(p, b, batch):
        out, new = model.apply(p, b, batch)
        return out.pow(2).mean(), new

    x = torch.randn(9, 3, dtype=torch.float64)
    for policy in ("replica0", "mean"):
        results = [fdp.value_and_grad(loss_fn, mesh, buffer_policy=policy)(
            model.params, model.buffers, x) for mesh in (threads_mesh(3), fdp.Mesh(3))]
        # (BatchNorm makes some gradients exactly 0 up to rounding: compare absolutely)
        torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="differs across replicas"):
        fdp.value_and_grad(loss_fn, threads_mesh(3), buffer_policy="sync")(
            model.params, model.buffers, x)


def test_exception_in_a_replica_names_it_and_nothing_hangs():
    mesh = threads_mesh(3)

    def body(v):
        if int(fdp.axis_index("dp")) == 1:
            raise KeyError("boom")
        return fdp.psum(v, "dp")  # the other replicas wait here for replica 1

    start = time.perf_counter()
    with pytest.raises(KeyError, match="boom") as info:
        fdp.pmap(body, mesh)(torch.arange(3.0))
    assert time.perf_counter() - start < 5
    assert any("replica 1 of 3 (device cpu)" in note for note in info.value.__notes__)
    # the mesh still works afterwards
    out = fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(torch.arange(3.0))
    assert torch.equal(out, torch.full((3,), 3.0))


def test_mismatched_shapes_across_replicas_raise():
    mesh = threads_mesh(2)

    def body(v):
        return fdp.psum(torch.ones(int(fdp.axis_index("dp")) + 1), "dp")

    with pytest.raises(ValueError, match=r"replica 0: .*float32\[1\], replica 1: .*float32\[2\]"):
        fdp.pmap(body, mesh)(torch.arange(2.0))


def test_a_stuck_replica_times_out():
    mesh = fdp.Mesh(devices=["cpu"] * 2, timeout=0.5)
    release = threading.Event()

    def body(v):
        if int(fdp.axis_index("dp")) == 0:
            release.wait(5)
        return v * 2

    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="replica 0"):
        fdp.pmap(body, mesh)(torch.arange(2.0))
    release.set()
    assert time.perf_counter() - start < 3
    assert torch.equal(fdp.pmap(lambda v: v * 2, mesh)(torch.arange(2.0)), torch.tensor([0., 2.]))


def test_torch_func_transforms_are_refused():
    mesh = threads_mesh(2)

    def f(w):
        return fdp.pmap(lambda v: v * w, mesh, out_axes=0)(torch.arange(2.0)).sum()

    with pytest.raises(RuntimeError, match=r"torch\.func transforms"):
        torch.func.grad(f)(torch.tensor(1.0))


def test_inputs_are_not_mutated():
    model, batch = _mlp(0), _batch(7)
    before = snapshot((model.params, batch))
    fdp.value_and_grad(_loss(model), threads_mesh(3))(model.params, batch)
    assert_unchanged(before, (model.params, batch))


def test_primitives_round_trip():
    mesh = threads_mesh(3)
    x = torch.randn(7, 2)
    assert torch.equal(fdp.gather(fdp.scatter(x, mesh), mesh), x)
    assert torch.equal(fdp.unreplicate(fdp.replicate(x, mesh), mesh), x)
    torch.testing.assert_close(fdp.all_reduce(fdp.replicate(x, mesh), mesh, "mean"),
                               fdp.replicate(x, mesh))


def test_mesh_arguments_are_checked():
    with pytest.raises(ValueError, match="devices is empty"):
        fdp.Mesh(devices=[])
    with pytest.raises(TypeError, match="list of devices"):
        fdp.Mesh(devices="cpu")
    with pytest.raises(ValueError, match="n=3 but 2 devices"):
        fdp.Mesh(3, devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="timeout"):
        fdp.Mesh(devices=["cpu"], timeout=0)
    mesh = fdp.Mesh(devices=["cpu", "cpu"])
    assert (mesh.size, mesh.backend_name) == (2, "threads")
    assert mesh.devices == (torch.device("cpu"),) * 2
    assert "threads" in repr(mesh)


def test_torch_randomness_modes_on_threads():
    mesh = threads_mesh(2)
    x = torch.ones(2, 1000)
    with pytest.raises(ValueError, match=r"randomness='error'.*convert_dropout"):
        fdp.pmap(lambda v: torch.nn.functional.dropout(v, 0.5), mesh)(x)
    with pytest.raises(ValueError, match="randomness='same' is not available"):
        fdp.pmap(lambda v: v, mesh, randomness="same")(x)
    out = fdp.pmap(lambda v: torch.nn.functional.dropout(v, 0.5), mesh,
                   randomness="different")(x)
    assert not torch.equal(out[0], out[1])
    kept, n = (out != 0).sum().item(), out.numel()
    assert abs(kept - 0.5 * n) <= 5 * (0.25 * n) ** 0.5  # 5 binomial standard deviations


def test_apply_follows_mode_changes_on_threads():
    """Replica threads use structural copies of the module; they follow .eval()/.train()."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    model = fdp.functionalize(net)
    mesh = threads_mesh(3)
    x = fdp.scatter(torch.randn(6, 3), mesh)

    def run():
        return fdp.gather(fdp.pmap(lambda xs: model.apply(model.params, model.buffers, xs)[0],
                                   mesh, randomness="different")(x), mesh)

    run()  # train mode: makes the copies
    net.eval()
    torch.testing.assert_close(run(), net(fdp.gather(x, mesh)))


def test_meshes_pickle_as_their_constructor_call():
    import pickle

    mesh = pickle.loads(pickle.dumps(fdp.Mesh(devices=["cpu"] * 2, axis_name="b", timeout=7)))
    assert (mesh.size, mesh.backend_name, mesh.axis_name) == (2, "threads", "b")
    assert mesh.backend.timeout == 7
    assert torch.equal(fdp.pmap(lambda v: fdp.psum(v, "b"), mesh)(torch.ones(2)),
                       torch.full((2,), 2.0))
    assert pickle.loads(pickle.dumps(fdp.Mesh(3, axis_name="x"))) == fdp.Mesh(3, axis_name="x")


def test_replicas_that_call_different_collectives_raise():
    mesh = threads_mesh(2)

    def body(v):
        return fdp.psum(v, "dp") if int(fdp.axis_index("dp")) == 0 else fdp.pmax(v, "dp")

    with pytest.raises(ValueError, match="disagree on the collective"):
        fdp.pmap(body, mesh)(torch.ones(2, 2))


def test_data_dependent_requires_grad_does_not_mix_collectives():
    """Replicas taking different paths through requires_grad still pair their collectives."""
    mesh = threads_mesh(2)
    fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(torch.tensor([[100.0, 100.0], [200.0, 200.0]]))
    w = torch.tensor([2.0, 3.0], requires_grad=True)

    def fn(w_, x):
        a, b = (x * w_, x) if bool(x.sum() > 0) else (x, x * w_)
        return fdp.psum(a, "dp"), fdp.psum(b, "dp")

    x = torch.tensor([[1.0, 1.0], [-1.0, -2.0]])
    a, b = fdp.pmap(fn, mesh, in_axes=(None, 0))(w, x)
    torch.testing.assert_close(a.detach(), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([[-1.0, -5.0], [-1.0, -5.0]]))


def test_a_failed_timeout_does_not_poison_the_next_call():
    mesh = fdp.Mesh(devices=["cpu"] * 2, timeout=0.5)

    def slow(v):
        if int(fdp.axis_index("dp")) == 1:
            time.sleep(1.0)
        return fdp.psum(v, "dp")

    with pytest.raises(TimeoutError, match=r"replica 1 \(device cpu\)"):
        fdp.pmap(slow, mesh)(torch.ones(2))
    time.sleep(1.0)  # the stale replica wakes up, fails in the old rendezvous
    assert torch.equal(fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(torch.ones(2)),
                       torch.full((2,), 2.0))


def test_nested_use_of_the_same_mesh_raises():
    mesh = threads_mesh(2)
    with pytest.raises(RuntimeError, match="nested use of the same mesh"):
        fdp.pmap(lambda v: fdp.pmap(lambda u: u, mesh)(torch.ones(2)) + v, mesh)(torch.ones(2))


def test_empty_replicas_do_not_join_collectives_in_the_loss():
    """As on vmap: in value_and_grad, the axis is the replicas that received rows."""
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.arange(8.0, dtype=torch.float64).reshape(4, 2)

    def loss(p, x):
        info = torch.stack([fdp.axis_index("dp"), torch.tensor(fdp.axis_size("dp"))])
        return ((x - fdp.pmean(x.mean(0), "dp")) @ p["w"]).pow(2).mean(), info.double()

    for split in ([2, 2, 0], [2, 0, 2]):
        got = fdp.value_and_grad(loss, threads_mesh(3), has_aux=True, split=split)({"w": w}, b)
        want = fdp.value_and_grad(loss, fdp.Mesh(3), has_aux=True, split=split)({"w": w}, b)
        torch.testing.assert_close(got, want)
        assert got[0][1].tolist() == [[0.0, 2.0], [1.0, 2.0]]


def test_autocast_reaches_the_replica_threads():
    mesh = threads_mesh(2)
    lin = nn.Linear(4, 3)
    model = fdp.functionalize(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fdp.pmap(lambda x: model.apply(model.params, model.buffers, x)[0], mesh)(
            torch.randn(2, 5, 4))
    assert out.dtype == torch.bfloat16


def test_integer_psum_has_one_dtype_on_every_backend():
    """As JAX: integers keep their dtype; bools are counted (int64, as torch.sum)."""
    x = torch.tensor([1, 2], dtype=torch.int32)
    for mesh in (threads_mesh(2), fdp.Mesh(2)):
        summed = fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(x)
        assert summed.dtype == torch.int32 and summed.tolist() == [3, 3]
        counted = fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(x > 1)
        assert counted.dtype == torch.int64 and counted.tolist() == [1, 1]


def test_replicas_must_agree_on_non_tensor_outputs_and_dtypes():
    mesh = threads_mesh(3)
    with pytest.raises(ValueError, match="different structure or different non-tensor"):
        fdp.pmap(lambda x: (x, int(fdp.axis_index("dp"))), mesh)(torch.ones(3))
    with pytest.raises(ValueError, match="different shape or dtype"):
        fdp.pmap(lambda x: x.double() if int(fdp.axis_index("dp")) else x, mesh)(torch.ones(3))
    assert fdp.pmap(lambda x: (x, "same"), mesh)(torch.ones(3))[1] == "same"


def test_an_extra_collective_on_one_replica_is_named():
    mesh = fdp.Mesh(devices=["cpu"] * 2, timeout=0.5)

    def body(v):
        out = fdp.psum(v, "dp")
        if int(fdp.axis_index("dp")) == 1:
            out = fdp.psum(out, "dp")
        return out

    with pytest.raises(TimeoutError, match=r"replica\(s\) 1 waited .* finished without"):
        fdp.pmap(body, mesh)(torch.ones(2))


def test_timed_out_replica_threads_end_instead_of_piling_up():
    before = {t.ident for t in threading.enumerate()}
    mesh = fdp.Mesh(devices=["cpu"] * 2, timeout=0.3)

    def body(v):
        if int(fdp.axis_index("dp")) == 0:
            end = time.monotonic() + 30
            while time.monotonic() < end:  # stuck in Python code, never reaching the psum
                pass
        return fdp.psum(v, "dp")

    for _ in range(4):
        with pytest.raises(TimeoutError, match="replica 0"):
            fdp.pmap(body, mesh)(torch.ones(2))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and \
            {t.ident for t in threading.enumerate()} - before:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.ident not in before]
    assert torch.equal(fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(torch.ones(2)),
                       torch.full((2,), 2.0))


def test_a_replica_runs_on_the_same_thread_every_step():
    mesh = threads_mesh(3)
    idents: list[list[int]] = []
    for _ in range(4):
        step: list[int] = [0] * 3

        def body(v, step=step):
            step[int(fdp.axis_index("dp"))] = threading.get_ident()
            return v

        fdp.pmap(body, mesh)(torch.ones(3))
        idents.append(step)
    assert all(s == idents[0] for s in idents) and len(set(idents[0])) == 3


_FIRST_CALLS = """
import torch, fdp
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
model = fdp.functionalize(net)
def loss_fn(p, b):
    return nn.functional.cross_entropy(model.apply(p, model.buffers, b["x"])[0], b["y"])
batch = {"x": torch.randn(37, 3, 8, 8), "y": torch.randint(0, 4, (37,))}
vg = fdp.value_and_grad(loss_fn, fdp.Mesh(devices=["cpu"] * 3))
runs = [vg(model.params, batch) for _ in range(3)]
same = all(torch.equal(r[0], runs[0][0]) and all(torch.equal(r[1][k], runs[0][1][k])
           for k in r[1]) for r in runs)
print("bitwise" if same else "differ")
"""


def test_the_first_call_in_a_process_is_bitwise_equal_to_later_ones():
    out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "bitwise", out.stderr[-2000:]
