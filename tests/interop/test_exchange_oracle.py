"""JAX as the oracle for the collectives that move parts of values (``psum_scatter``,
``all_to_all``, ``ppermute``, ``pshuffle``), for collectives over a tuple of axis names in
nested pmaps, and for JAX's dtype rules: values and gradients, float64, vmap and threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fdp
from tests.helpers import F64_REL, assert_close

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
lax = jax.lax

AXIS = "dp"


def _cases(n: int, perm: list[int]) -> dict[str, tuple[Callable, Callable, tuple[int, ...]]]:
    """name -> (fdp's replica function, JAX's, the per-replica shape it takes)."""
    pairs = [(src, dst) for dst, src in enumerate(perm)]  # a full permutation, as vmap needs
    return {
        "psum_scatter": (lambda v: fdp.psum_scatter(v, AXIS),
                         lambda v: lax.psum_scatter(v, AXIS), (n, 2)),
        "psum_scatter_dim1_tiled": (
            lambda v: fdp.psum_scatter(v, AXIS, scatter_dimension=1, tiled=True),
            lambda v: lax.psum_scatter(v, AXIS, scatter_dimension=1, tiled=True), (2, 2 * n)),
        "all_to_all": (lambda v: fdp.all_to_all(v, AXIS, 0, 1),
                       lambda v: lax.all_to_all(v, AXIS, 0, 1), (n, 3)),
        "all_to_all_tiled": (lambda v: fdp.all_to_all(v, AXIS, 1, 0, tiled=True),
                             lambda v: lax.all_to_all(v, AXIS, 1, 0, tiled=True), (2, 3 * n)),
        "ppermute": (lambda v: fdp.ppermute(v, AXIS, pairs),
                     lambda v: lax.ppermute(v, AXIS, pairs), (3,)),
        "pshuffle": (lambda v: fdp.pshuffle(v, AXIS, perm),
                     lambda v: lax.pshuffle(v, AXIS, perm), (2, 2)),
    }


def _ours(fn: Callable, mesh: fdp.Mesh, x: torch.Tensor, w: torch.Tensor) -> tuple:
    x = x.clone().requires_grad_()
    out = fdp.pmap(fn, mesh)(x)
    (out * w).sum().backward()
    return out.detach(), x.grad


def _theirs(fn: Callable, x: np.ndarray, w: np.ndarray) -> tuple:
    mapped = jax.vmap(fn, axis_name=AXIS)
    out = mapped(x)
    grad = jax.grad(lambda u: (mapped(u) * w).sum())(x)
    return torch.from_numpy(np.array(out)), torch.from_numpy(np.array(grad))


@settings(max_examples=min(settings().max_examples, 20))  # JAX compiles each new shape
@given(n=st.integers(1, 4), kind=st.sampled_from(["vmap", "threads"]),
       seed=st.integers(0, 2**16), data=st.data())
def test_exchanges_and_their_gradients_match_jax(n, kind, seed, data):
    perm = list(data.draw(st.permutations(range(n))))
    mesh = fdp.Mesh(n) if kind == "vmap" else fdp.Mesh(devices=["cpu"] * n)
    gen = torch.Generator().manual_seed(seed)
    with jax.enable_x64(True):
        for name, (ours, theirs, shape) in _cases(n, perm).items():
            x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
            out, _ = _theirs(theirs, x.numpy(), np.zeros(1))
            w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            want = _theirs(theirs, x.numpy(), w.numpy())
            got = _ours(ours, mesh, x, w)
            assert_close(got, want, F64_REL), name


def test_ppermute_with_partial_pairs_matches_jax_pmap(host_devices):
    n, pairs = 4, [(0, 2), (2, 1)]  # replicas 0 and 3 receive nothing: zeros
    x = torch.randn(n, 3, dtype=torch.float64)
    with jax.enable_x64(True):
        theirs = jax.pmap(lambda v: lax.ppermute(v, AXIS, pairs), axis_name=AXIS,
                          devices=host_devices[:n])(x.numpy())
    for mesh in (fdp.Mesh(n), fdp.Mesh(devices=["cpu"] * n)):
        ours = fdp.pmap(lambda v: fdp.ppermute(v, AXIS, pairs), mesh)(x)
        assert_close(ours, torch.from_numpy(np.array(theirs)), F64_REL)


def _nested(program: Callable, outer: fdp.Mesh, inner: fdp.Mesh, x: torch.Tensor) -> Any:
    return fdp.pmap(lambda row: fdp.pmap(program, inner)(row), outer)(x)


@pytest.mark.parametrize("names", [("i", "j"), ("j", "i")])
@pytest.mark.parametrize("kind", ["vmap", "threads"])
def test_tuple_axis_collectives_in_nested_pmaps_match_jax(names, kind):
    ni, nj = 2, 3
    # threads: replica threads of "i", each running a vmap over "j" (a threads pmap inside
    # another's replica cannot see the outer axis: its frames live in other threads)
    outer = fdp.Mesh(ni, axis_name="i") if kind == "vmap" else \
        fdp.Mesh(devices=["cpu"] * ni, axis_name="i")
    inner = fdp.Mesh(nj, axis_name="j")
    x = torch.randn(ni, nj, 2, dtype=torch.float64)

    def program(lib: Any) -> Callable:
        def f(v: Any) -> tuple:
            return (lib.psum(v, names), lib.pmean(v, names), lib.pmax(v, names),
                    lib.axis_index(names))
        return f

    ours = _nested(program(fdp), outer, inner, x)
    with jax.enable_x64(True):
        theirs = jax.vmap(jax.vmap(program(lax), axis_name="j"), axis_name="i")(x.numpy())
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, torch.from_numpy(np.array(b)).to(a.dtype), F64_REL)
    # JAX's vmap cannot all_gather over a tuple; the order is axis_index's (last name fastest)
    gathered = _nested(lambda v: fdp.all_gather(v, names), outer, inner, x)
    flat = x.reshape(ni * nj, 2) if names == ("i", "j") else x.transpose(0, 1).reshape(-1, 2)
    assert torch.equal(gathered, flat.expand(ni, nj, ni * nj, 2))
    assert _nested(lambda v: torch.tensor(fdp.axis_size(names)), outer, inner, x).eq(6).all()


def test_dtype_rules_and_python_numbers_match_jax(host_devices):
    n = 4
    ints = torch.arange(n, dtype=torch.int32)
    bools = torch.tensor([True, False, True, True])
    program = {
        "psum_int32": lambda lib, v: lib.psum(v, AXIS),
        "pmean_int32": lambda lib, v: lib.pmean(v, AXIS),
        "pmax_int32": lambda lib, v: lib.pmax(v, AXIS),
    }
    with jax.enable_x64(False):
        for name, f in program.items():
            theirs = np.asarray(jax.pmap(lambda v, f=f: f(lax, v), axis_name=AXIS,
                                         devices=host_devices[:n])(ints.numpy()))
            ours = fdp.pmap(lambda v, f=f: f(fdp, v), fdp.Mesh(n))(ints)
            assert str(ours.dtype).replace("torch.", "") == str(theirs.dtype), name
            assert np.allclose(ours.numpy(), theirs), name
        mean_of_bools = jax.pmap(lambda v: lax.pmean(v, AXIS), axis_name=AXIS,
                                 devices=host_devices[:n])(bools.numpy())
        number = jax.pmap(lambda v: 3, axis_name=AXIS, devices=host_devices[:n])(ints.numpy())
    assert np.allclose(fdp.pmap(lambda v: fdp.pmean(v, AXIS), fdp.Mesh(n))(bools).numpy(),
                       np.asarray(mean_of_bools))
    for mesh in (fdp.Mesh(n), fdp.Mesh(devices=["cpu"] * n)):
        assert fdp.pmap(lambda v: 3, mesh)(ints).tolist() == np.asarray(number).tolist()
        assert fdp.pmap(lambda v: fdp.axis_size(AXIS), mesh)(ints).tolist() == [n] * n
        assert fdp.pmap(lambda v: 2.5, mesh, out_axes=None)(ints).item() == 2.5


@pytest.mark.parametrize("kind", ["vmap", "threads"])
def test_axis_index_groups_match_jax_pmap(host_devices, kind):
    n, groups = 4, [[0, 2], [3, 1]]  # not contiguous, members not sorted
    mesh = fdp.Mesh(n) if kind == "vmap" else fdp.Mesh(devices=["cpu"] * n)
    x = torch.randn(n, 3, dtype=torch.float64)

    def program(lib: Any) -> Callable:
        def f(v: Any) -> tuple:
            return (lib.psum(v, AXIS, axis_index_groups=groups),
                    lib.pmean(v, AXIS, axis_index_groups=groups),
                    lib.pmax(v, AXIS, axis_index_groups=groups),
                    lib.all_gather(v, AXIS, axis_index_groups=groups))
        return f

    ours = fdp.pmap(program(fdp), mesh)(x)
    with jax.enable_x64(True):
        theirs = jax.pmap(program(lax), axis_name=AXIS, devices=host_devices[:n])(x.numpy())
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, torch.from_numpy(np.array(b)), F64_REL)
