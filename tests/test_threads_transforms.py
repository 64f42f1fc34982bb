"""torch.func transforms and torch.compile inside the replica threads of a threads mesh
(issue #13): an outer backward through ``torch.func.grad`` in the replicas, eager collectives
while another replica thread compiles, and forward-mode AD (process-wide in torch)."""

from __future__ import annotations

import threading

import pytest
import torch

import fdp
from tests.helpers import F64_REL, assert_close

f64 = torch.float64
_MESHES: dict[int, fdp.Mesh] = {}


def threads_mesh(n: int) -> fdp.Mesh:
    if n not in _MESHES:  # the timeout bounds a regression (a hang) to seconds
        _MESHES[n] = fdp.Mesh(devices=["cpu"] * n, timeout=20)
    return _MESHES[n]


_BODIES = {
    "psum": lambda u: (fdp.psum(u, "dp") ** 2).sum(),
    "all_gather": lambda u: (fdp.all_gather(u, "dp") ** 3).sum(),
    "pmax+pmean": lambda u: (fdp.pmax(u, "dp") ** 2).sum() + fdp.pmean(u.sin(), "dp").sum(),
    "grouped": lambda u: (fdp.psum(u, "dp", axis_index_groups=[[0, 2, 4, 6], [1, 3, 5, 7]])
                          * u.cos()).sum(),
}


@pytest.mark.parametrize("body", list(_BODIES))
def test_backward_through_grad_of_collectives_in_the_replicas(body):
    """The outer backward runs every replica's backward in one engine thread: the graph that
    torch.func.grad leaves on the outer tape must need no rendezvous (it used to wait for the
    mesh timeout)."""
    loss = _BODIES[body]

    def f(mesh, w):
        return fdp.pmap(lambda v: torch.func.grad(loss)(v), mesh)(w)

    torch.manual_seed(0)
    w = torch.randn(8, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: f(threads_mesh(8), w), (w,))
    out, ref = f(threads_mesh(8), w), f(fdp.Mesh(8), w)
    assert_close(out, ref, F64_REL)
    cot = torch.randn(8, 3, dtype=f64)
    (g,) = torch.autograd.grad(out, [w], cot)
    (g_ref,) = torch.autograd.grad(ref, [w], cot)
    assert_close(g, g_ref, F64_REL)


def test_vmap_inside_grad_inside_the_replicas_under_an_outer_backward():
    def f(mesh, w):
        inner = torch.func.grad(lambda u: torch.func.vmap(
            lambda r: fdp.psum(r.sin(), "dp"))(u).pow(2).sum())
        return fdp.pmap(inner, mesh)(w)

    w = torch.randn(4, 2, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: f(threads_mesh(4), w), (w,))
    assert_close(f(threads_mesh(4), w), f(fdp.Mesh(4), w), F64_REL)


def _body(v):
    return fdp.psum(v.sin(), "dp") * 2


def test_compiled_replicas_fall_back_to_eager_collectives_every_time():
    """Each replica thread compiles its function; a replica that runs the collective eagerly
    must not see a peer thread's compilation as its own (torch.compiler.is_compiling() is
    process-wide)."""
    mesh = threads_mesh(4)
    x = torch.randn(4, 3, dtype=f64)
    eager = fdp.pmap(_body, mesh)(x)
    for _ in range(3):  # the deterministic race is tested below; this is the real one
        torch._dynamo.reset()
        assert_close(fdp.pmap(torch.compile(_body), mesh)(x), eager, F64_REL)
    torch._dynamo.reset()


def test_eager_collectives_while_another_thread_compiles():
    """Deterministic: a compilation holds torch's process-wide compiling flag while the
    replicas run their collectives eagerly."""
    started, release = threading.Event(), threading.Event()

    def slow_backend(gm, example_inputs):
        started.set()
        release.wait(30)
        return gm

    compiler = threading.Thread(
        target=lambda: torch.compile(lambda t: t.cos() + 1, backend=slow_backend)(torch.ones(2)))
    compiler.start()
    try:
        assert started.wait(30)
        assert torch.compiler.is_compiling()  # the flag other threads see
        mesh, x = threads_mesh(4), torch.randn(4, 3, dtype=f64)
        assert_close(fdp.pmap(_body, mesh)(x), fdp.pmap(_body, fdp.Mesh(4))(x), F64_REL)
        model = fdp.functionalize(torch.nn.Linear(3, 1).double())
        vg = fdp.value_and_grad(lambda p, b: model.apply(p, model.buffers, b)[0].pow(2).mean(),
                                mesh)
        assert_close(vg(model.params, x), fdp.value_and_grad(
            lambda p, b: model.apply(p, model.buffers, b)[0].pow(2).mean(), fdp.Mesh(4))(
            model.params, x), F64_REL)
    finally:
        release.set()
        compiler.join(30)
        torch._dynamo.reset()


_JVPS = {
    "jvp(psum)": lambda v: torch.func.jvp(lambda u: fdp.psum(u.sin(), "dp"), (v,),
                                          (torch.ones_like(v),))[1],
    "jacfwd(all_gather)": lambda v: torch.func.jacfwd(
        lambda u: fdp.all_gather(u.sin(), "dp").sum(0))(v),
    "vmap(jvp(pmean))": lambda v: torch.func.vmap(lambda r: torch.func.jvp(
        lambda u: fdp.pmean(u * u, "dp"), (r,), (r,))[1])(v),
}


@pytest.mark.parametrize("fn", list(_JVPS))
def test_collectives_inside_forward_mode_ad_are_refused_on_threads(fn):
    """torch's forward-AD levels are process-wide: concurrent jvps in replica threads raised
    torch's level errors or returned wrong tangents, at random. Every replica must be inside
    its jvp at once to meet in the collective, so no lock can serialise them: refused, with
    the fix; the vmap mesh computes it."""
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(10):
        with pytest.raises(RuntimeError, match=r"process-wide.*fdp\.Mesh\(n\)") as info:
            fdp.pmap(_JVPS[fn], threads_mesh(4))(x)
        assert "threads mesh" in str(info.value)
    out = fdp.pmap(_JVPS[fn], fdp.Mesh(4))(x)
    if fn == "jvp(psum)":
        assert_close(out, x.cos().sum(0).expand(4, 3), F64_REL)


def test_torchs_forward_ad_errors_from_replicas_are_explained():
    from fdp import _explain

    raw = RuntimeError("Trying to access a forward AD level with an invalid index. This index "
                       "was either not created or is already deleted.")
    better = _explain.forward_ad(raw)
    assert better is not None and better.__cause__ is raw
    assert "process-wide" in str(better) and "fdp.Mesh(n)" in str(better)
    assert _explain.forward_ad(better) is better
    assert _explain.forward_ad(RuntimeError("shape mismatch")) is None
    assert _explain.forward_ad(ValueError("forward AD")) is None


def test_reverse_mode_inside_the_replicas_still_works():
    x = torch.randn(4, 3, dtype=f64)

    def body(v):
        return torch.func.jacrev(lambda u: fdp.psum(u.sin(), "dp"))(v)

    assert_close(fdp.pmap(body, threads_mesh(4))(x), fdp.pmap(body, fdp.Mesh(4))(x), F64_REL)
