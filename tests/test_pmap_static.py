"""fdp.pmap's JAX spellings: static_broadcasted_argnums, and axes given as tree prefixes."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fdp
from tests.helpers import F64_REL, assert_close, assert_unchanged, mesh_sizes, snapshot

f64 = torch.float64


class Pair(NamedTuple):
    mapped: torch.Tensor
    shared: torch.Tensor


# --- static_broadcasted_argnums -------------------------------------------------------------------

@given(n=mesh_sizes, power=st.integers(1, 3))
def test_static_args_reach_every_replica_unmapped_and_untraced(n, power):
    mesh = fdp.Mesh(n)
    seen = []

    def f(x, p, act, table):
        seen.append((type(p), act, table))
        return fdp.psum(act(x) ** p, "dp") + table["bias"]

    table = {"bias": torch.arange(3.0, dtype=f64)}  # not size n: would fail if it were mapped
    x = torch.randn(n, 3, dtype=f64)
    out = fdp.pmap(f, mesh, static_broadcasted_argnums=(1, 2, 3))(x, power, torch.tanh, table)
    ref = (torch.tanh(x) ** power).sum(0) + table["bias"]
    assert_close(out, ref.expand(n, 3), F64_REL)
    assert seen == [(int, torch.tanh, table)]  # traced once (vmap), the very objects passed


def test_negative_positions_count_from_the_end_and_in_axes_covers_every_argument():
    mesh = fdp.Mesh(2)
    f = fdp.pmap(lambda w, x, scale: scale * (x @ w), mesh, in_axes=(None, 0, {"any": 0}),
                 static_broadcasted_argnums=-1)  # the static entry of in_axes is ignored
    w, x = torch.randn(3, 2, dtype=f64), torch.randn(2, 4, 3, dtype=f64)
    assert_close(f(w, x, 2.0), 2.0 * (x @ w), F64_REL)


def test_static_args_with_sharded_inputs_keywords_and_grads():
    mesh = fdp.Mesh(3)
    p = {"w": torch.randn(4, dtype=f64)}
    x = torch.randn(7, 4, dtype=f64)

    def per_example(loss_scale, params, rows, *, shift):
        return loss_scale * (rows @ params["w"] + shift)

    f = fdp.pmap(per_example, mesh, in_axes=(None, None, 0), static_broadcasted_argnums=0)
    out = f(3.0, p, fdp.scatter(x, mesh), shift=1.0)
    assert isinstance(out, fdp.Sharded)
    assert_close(fdp.gather(out, mesh), 3.0 * (x @ p["w"] + 1.0), F64_REL)

    def total(w):
        return fdp.pmap(lambda k, v: fdp.psum(k * (v @ w), "dp"), mesh, out_axes=None,
                        static_broadcasted_argnums=0)(2.0, x[:6].reshape(3, 2, 4)).sum()

    assert_close(torch.func.grad(total)(p["w"]), 2.0 * x[:6].sum(0), F64_REL)


def test_static_args_are_not_mutated_and_work_under_compile():
    mesh = fdp.Mesh(2)
    table = {"bias": torch.ones(3, dtype=f64)}
    before = snapshot(table)
    f = fdp.pmap(lambda t, x: x + t["bias"], mesh, static_broadcasted_argnums=0)
    x = torch.randn(2, 3, dtype=f64)
    compiled = torch.compile(lambda x: f(table, x), backend="eager")  # dynamo traces pmap
    assert_close(compiled(x), x + 1.0, F64_REL)
    assert_close(f(table, x), x + 1.0, F64_REL)
    assert_unchanged(before, table)


@pytest.mark.parametrize("argnums, error, match", [
    (True, TypeError, r"static_broadcasted_argnums must be an int or a sequence of ints"),
    (1.0, TypeError, r"must be an int or a sequence of ints.*got 1\.0"),
    ("0", TypeError, r"must be an int or a sequence of ints"),
    ((0, None), TypeError, r"must be an int or a sequence of ints"),
    (2, ValueError, r"static_broadcasted_argnums=2 has \[2\], out of range for f, which takes 2 "
                    r"positional arguments \(valid: -2 \.\. 1\)"),
    ((0, -3), ValueError, r"has \[-3\], out of range"),
])
def test_bad_static_argnums_are_rejected_when_pmap_is_built(argnums, error, match):
    def f(a, b, *, c=1):
        return a

    with pytest.raises(error, match=match):
        fdp.pmap(f, fdp.Mesh(2), static_broadcasted_argnums=argnums)


def test_bad_static_argnums_are_rejected_when_called():
    mesh = fdp.Mesh(2)
    f = fdp.pmap(lambda *args: args[0], mesh, static_broadcasted_argnums=2)
    with pytest.raises(ValueError, match=r"static_broadcasted_argnums has \[2\], but the function "
                                         r"was called with 1 positional argument; pass the "
                                         r"static values positionally"):
        f(torch.ones(2))
    g = fdp.pmap(lambda a, b: a, mesh, static_broadcasted_argnums=1)
    with pytest.raises(ValueError, match=r"args\[1\] is Sharded .* static_broadcasted_argnums"):
        g(torch.ones(2), fdp.scatter(torch.ones(4), mesh))
    h = fdp.pmap(lambda a, b: a, mesh, in_axes=(0,), static_broadcasted_argnums=1)
    with pytest.raises(ValueError, match=r"in_axes has 1 entries but the function got 2 "
                                         r"positional arguments; with static_broadcasted_argnums"):
        h(torch.ones(2), "static")
    k = fdp.pmap(lambda a, b: a, mesh, static_broadcasted_argnums=1)
    with pytest.raises(ValueError, match=r"args\[0\] has size 3 at in_axes=0"):  # original index
        k(torch.ones(3), "static")


# --- in_axes / out_axes as tree prefixes -------------------------------------------------------

def test_dict_prefixes_match_by_key_not_by_position():
    """JAX sorts dict keys; a prefix written in another order must still match by key."""
    mesh = fdp.Mesh(2)
    f = fdp.pmap(lambda d: d["a"] + d["b"], mesh, in_axes=({"b": None, "a": 0},))
    a, b = torch.randn(2, 3, dtype=f64), torch.randn(3, dtype=f64)
    assert_close(f({"a": a, "b": b}), a + b, F64_REL)
    assert_close(f({"b": b, "a": a}), a + b, F64_REL)
    g = fdp.pmap(lambda x: {"m": x, "s": fdp.psum(x, "dp")}, mesh,
                 out_axes=OrderedDict([("s", None), ("m", 0)]))
    out = g(a)
    assert list(out) == ["m", "s"]
    assert_close(out, {"m": a, "s": a.sum(0)}, F64_REL)


def test_nested_prefixes_with_namedtuples_and_lists():
    mesh = fdp.Mesh(3)
    x = torch.randn(3, 2, dtype=f64)
    shared = torch.randn(2, dtype=f64)
    f = fdp.pmap(lambda pair, extra: [pair.mapped * pair.shared, fdp.pmean(extra[0], "dp")],
                 mesh, in_axes=(Pair(0, None), [1]), out_axes=[1, None])
    out = f(Pair(x, shared), [x.t().clone()])
    assert_close(out[0], (x * shared).t(), F64_REL)
    assert_close(out[1], x.mean(0), F64_REL)
    with pytest.raises(ValueError, match=r"in_axes=.* does not match the structure of the "
                                         r"arguments: in_axes\[0\] has keys \['x'\] but the "
                                         r"value there has keys \['y'\]"):
        fdp.pmap(lambda d: d, mesh, in_axes=({"x": 0},))({"y": x})
