"""pmap and the named-axis collectives: the laws of docs/guarantees.md and the vmap pitfalls."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, hessian, jacrev, jvp, vmap

import fdp
from tests.helpers import F32_REL, F64_REL, assert_close, batch_sizes, mesh_sizes, splits

f64 = torch.float64


def _per_example(p, x):
    return torch.tanh(x @ p["w"] + p["b"])


DTYPES = st.sampled_from([(torch.float64, F64_REL), (torch.float32, F32_REL)])


@given(n=mesh_sizes, b=batch_sizes, data=st.data(), dtype=DTYPES)
def test_gather_pmap_scatter_is_the_function(n, b, data, dtype):
    """gather(pmap(f)(replicate(p), scatter(x))) == f(p, x) for a per-example f."""
    dt, rel = dtype
    mesh = fdp.Mesh(n)
    p = {"w": torch.randn(3, 2, dtype=dt), "b": torch.randn(2, dtype=dt)}
    x = torch.randn(b, 3, dtype=dt)
    out = fdp.pmap(_per_example, mesh)(fdp.replicate(p, mesh),
                                        fdp.scatter(x, mesh, split=data.draw(splits(b, n))))
    assert isinstance(out, fdp.Sharded)
    assert_close(fdp.gather(out, mesh), _per_example(p, x), rel)


@given(n=mesh_sizes, op=st.sampled_from(["psum", "pmean", "pmax", "pmin"]), dtype=DTYPES)
def test_reductions_match_all_reduce(n, op, dtype):
    dt, rel = dtype
    mesh = fdp.Mesh(n)
    x = {"a": torch.randn(n, 3, dtype=dt), "b": [torch.randn(n, dtype=dt)]}
    collective = getattr(fdp, op)
    out = fdp.pmap(lambda t: collective(t, "dp"), mesh)(x)
    ref = fdp.all_reduce(x, mesh, {"psum": "sum", "pmean": "mean", "pmax": "max",
                                   "pmin": "min"}[op])
    assert_close(out, ref, rel)


@given(n=mesh_sizes, tiled=st.booleans(), data=st.data())
def test_all_gather_axis_index_axis_size(n, tiled, data):
    axis = data.draw(st.integers(-1, 0) if tiled else st.integers(-2, 1))
    mesh = fdp.Mesh(n)
    x = torch.randn(n, 2, dtype=f64)

    def f(v):
        return (fdp.all_gather(v, "dp", axis=axis, tiled=tiled), fdp.axis_index("dp"),
                fdp.axis_size("dp"))

    gathered, index, size = fdp.pmap(f, mesh, out_axes=(None, 0, None))(x)
    ref = torch.cat(list(x), axis) if tiled else torch.stack(list(x), axis % 2)
    assert torch.equal(gathered, ref)
    assert index.tolist() == list(range(n)) and size == n


@given(n=mesh_sizes)
def test_unbatched_input_pitfall(n):
    """Pitfall: psum of a value that is the same on every replica is N times it (not once)."""
    mesh = fdp.Mesh(n)
    f = fdp.pmap(lambda x: (fdp.psum(torch.tensor(1.0), "dp"), fdp.pmean(2.0, "dp"),
                            fdp.psum(x * 0 + 3.0, "dp")), mesh, out_axes=None)
    ones, twos, threes = f(torch.zeros(n))
    assert ones.item() == n and twos.item() == 2.0 and threes.item() == 3.0 * n
    p = torch.tensor(1.5)
    g = fdp.pmap(lambda _, w: fdp.psum(w, "dp"), mesh, in_axes=(0, None), out_axes=None)
    assert g(torch.zeros(n), p).item() == pytest.approx(1.5 * n)


@given(n=mesh_sizes)
def test_psum_transposes_to_psum(n):
    """Grad of a psum'd value: every replica's input gets the sum of all cotangents."""
    mesh = fdp.Mesh(n)
    x = torch.randn(n, dtype=f64)
    c = torch.randn(n, dtype=f64)  # per-replica cotangent weights

    def total(x):
        return (fdp.pmap(lambda xi, ci: fdp.psum(xi, "dp") * ci, mesh)(x, c)).sum()

    assert_close(grad(total)(x), c.sum().expand(n), F64_REL)
    inner = fdp.pmap(grad(lambda xi, ci: fdp.psum(xi, "dp") * ci), mesh)(x, c)
    assert_close(inner, c.sum().expand(n), F64_REL)  # grad inside pmap: same transpose


@given(n=mesh_sizes, op=st.sampled_from(["pmean", "pmax", "pmin"]))
def test_reduction_grads_match_autograd(n, op):
    mesh = fdp.Mesh(n)
    x = torch.randn(n, 3, dtype=f64)
    w = torch.randn(n, 3, dtype=f64)
    collective = getattr(fdp, op)

    def total(x):
        return fdp.pmap(lambda xi, wi: (collective(xi, "dp") * wi).sum(), mesh)(x, w).sum()

    def reference(x):
        red = {"pmean": x.mean(0), "pmax": x.amax(0), "pmin": x.amin(0)}[op]
        return (red * w).sum()

    assert_close(grad(total)(x), grad(reference)(x), F64_REL)
    inner = fdp.pmap(grad(lambda xi, wi: (collective(xi, "dp") * wi).sum()), mesh)(x, w)
    assert_close(inner, grad(reference)(x), F64_REL)


@given(n=mesh_sizes, k=st.integers(1, 3))
def test_all_gather_grad(n, k):
    mesh = fdp.Mesh(n)
    x = torch.randn(n, k, dtype=f64)
    w = torch.randn(n, n, k, dtype=f64)  # replica j weighs the gathered value with w[j]

    def total(x):
        return fdp.pmap(lambda xi, wi: (fdp.all_gather(xi, "dp") * wi).sum(), mesh)(x, w).sum()

    assert_close(grad(total)(x), w.sum(0), F64_REL)
    inner = fdp.pmap(grad(lambda xi, wi: (fdp.all_gather(xi, "dp") * wi).sum()), mesh)(x, w)
    assert_close(inner, w.sum(0), F64_REL)


@given(n=mesh_sizes, b=st.integers(1, 6))
def test_grad_of_pmap_equals_pmap_of_grad_plus_all_reduce(n, b):
    mesh = fdp.Mesh(n)
    p = {"w": torch.randn(3, 2, dtype=f64), "b": torch.randn(2, dtype=f64)}
    x = torch.randn(n, b, 3, dtype=f64)

    def local_loss(p, xi):
        return _per_example(p, xi).pow(2).mean()

    def fused(p):
        return fdp.pmap(lambda xi: fdp.pmean(local_loss(p, xi), "dp"), mesh,
                        out_axes=None)(x)

    per_replica = fdp.pmap(grad(local_loss), mesh, in_axes=(None, 0))(p, x)
    assert_close(grad(fused)(p), fdp.unreplicate(fdp.all_reduce(per_replica, mesh), mesh),
                 F64_REL)


def test_jacrev_through_psum():
    mesh = fdp.Mesh(3)
    x = torch.randn(3, dtype=f64)
    jac = jacrev(lambda x: fdp.pmap(lambda v: fdp.psum(v * v, "dp"), mesh)(x))(x)
    assert_close(jac, (2 * x).expand(3, 3), F64_REL)


def test_nested_axis_names():
    """An inner pmap over axis 'j' inside an outer pmap over 'i': each collective picks its own."""
    outer, inner = fdp.Mesh(2, axis_name="i"), fdp.Mesh(3, axis_name="j")
    x = torch.arange(6.0, dtype=f64).view(2, 3)

    def row(r):
        return fdp.pmap(lambda v: (fdp.psum(v, "i"), fdp.psum(v, "j"), fdp.axis_index("i")),
                        inner)(r)

    over_i, over_j, idx = fdp.pmap(row, outer)(x)
    assert torch.equal(over_i, x.sum(0).expand(2, 3))
    assert torch.equal(over_j, x.sum(1, keepdim=True).expand(2, 3))
    assert idx.tolist() == [[0, 0, 0], [1, 1, 1]]


def test_collective_under_a_user_vmap_inside_pmap():
    mesh = fdp.Mesh(2)
    x = torch.arange(8.0).view(2, 4)
    out = fdp.pmap(lambda r: vmap(lambda e: fdp.psum(e, "dp"))(r), mesh)(x)
    assert torch.equal(out, x.sum(0).expand(2, 4))
    gathered = fdp.pmap(lambda r: vmap(lambda e: fdp.all_gather(e, "dp"))(r), mesh)(x)
    assert torch.equal(gathered, x.T.expand(2, 4, 2))


def test_in_axes_out_axes_prefixes():
    mesh = fdp.Mesh(3)
    a = torch.randn(2, 3)  # replica axis 1
    b = {"k": torch.randn(5)}  # shared

    def f(a, b):
        return {"sum": a.sum() + b["k"].sum(), "a": a}

    out = fdp.pmap(f, mesh, in_axes=(1, None), out_axes={"sum": 0, "a": 1})(a, b)
    assert torch.allclose(out["sum"], a.sum(0) + b["k"].sum())
    assert torch.equal(out["a"], a)
    out2 = fdp.pmap(f, mesh, in_axes=[1, None])(a, b)
    assert out2["a"].shape == (3, 2)


def test_kwargs_are_broadcast_and_static_outputs_pass_through():
    mesh = fdp.Mesh(2)
    out = fdp.pmap(lambda x, *, scale: (x * scale, "tag", None), mesh)(torch.ones(2),
                                                                      scale=3.0)
    assert out[0].tolist() == [3.0, 3.0] and out[1] == "tag" and out[2] is None


def test_pmap_of_a_functionalized_module_matches_the_module():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    model = fdp.functionalize(module)
    mesh = fdp.Mesh(3)
    x = torch.randn(7, 4, dtype=f64)
    out = fdp.pmap(lambda p, xb: model.apply(p, model.buffers, xb)[0], mesh, in_axes=(None, 0))(
        model.params, fdp.scatter(x, mesh))
    assert_close(fdp.gather(out, mesh), module(x).detach(), F64_REL)


@given(n=mesh_sizes, op=st.sampled_from(["psum", "pmean", "pmax", "pmin", "all_gather"]))
def test_forward_mode_inside_and_outside_pmap(n, op):
    mesh = fdp.Mesh(n)
    x, t = torch.randn(n, dtype=f64), torch.randn(n, dtype=f64)
    collective = getattr(fdp, op)
    reference = {"psum": lambda v: v.sum(), "pmean": lambda v: v.mean(),
                 "pmax": lambda v: v.amax(), "pmin": lambda v: v.amin(),
                 "all_gather": lambda v: v}[op]
    expect = jvp(lambda v: reference(v * v), (x,), (t,))[1]
    inside = fdp.pmap(lambda v, tv: jvp(lambda y: collective(y * y, "dp"), (v,), (tv,))[1],
                      mesh)(x, t)
    outside = jvp(lambda y: fdp.pmap(lambda v: collective(v * v, "dp"), mesh)(y), (x,), (t,))[1]
    assert_close(inside, expect.expand(n, *expect.shape), F64_REL)
    assert_close(outside, expect.expand(n, *expect.shape), F64_REL)


def test_hessian_through_psum():
    mesh = fdp.Mesh(3)
    x = torch.randn(3, dtype=f64)
    h = hessian(lambda y: fdp.pmap(lambda v: fdp.psum(v**3, "dp"), mesh, out_axes=None)(y))(x)
    assert_close(h, torch.diag(6 * x), F64_REL)


@pytest.mark.parametrize("op", ["pmax", "pmin"])
def test_tied_extremes_share_the_gradient(op):
    mesh = fdp.Mesh(4)
    x = torch.tensor([1.0, 3.0, 3.0, -1.0], dtype=f64) * (1 if op == "pmax" else -1)
    collective = getattr(fdp, op)
    g = grad(lambda x: fdp.pmap(lambda v: collective(v, "dp"), mesh, out_axes=None)(x))(x)
    assert g.tolist() == [0.0, 0.5, 0.5, 0.0]  # as torch.amax/amin: split among the ties


def test_nested_all_gather_and_nested_grads():
    outer, inner = fdp.Mesh(2, axis_name="i"), fdp.Mesh(3, axis_name="j")
    x = torch.randn(2, 3, dtype=f64)

    def row(r):
        return fdp.pmap(lambda v: (fdp.all_gather(v, "i"), fdp.all_gather(v, "j")), inner)(r)

    over_i, over_j = fdp.pmap(row, outer)(x)
    assert torch.equal(over_i, x.T.expand(2, 3, 2))  # replica (i, j) sees column j
    assert torch.equal(over_j, x.unsqueeze(1).expand(2, 3, 3))

    def total(x):  # sum_ij x_ij * colsum_j, so d/dx_ij = 2 * colsum_j
        return fdp.pmap(lambda r: fdp.pmap(lambda v: v * fdp.psum(v, "i"), inner)(r),
                        outer)(x).sum()

    assert_close(grad(total)(x), 2 * x.sum(0).expand(2, 3), F64_REL)


def test_collectives_over_trees_with_none_and_numbers():
    mesh = fdp.Mesh(3)
    out = fdp.pmap(lambda v: fdp.psum({"a": v, "b": None, "c": 2}, "dp"), mesh)(torch.ones(3))
    assert out["b"] is None and out["c"].tolist() == [6, 6, 6] and out["a"].tolist() == [3] * 3
