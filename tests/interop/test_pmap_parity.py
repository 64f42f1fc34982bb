"""fdp.pmap and jax.pmap agree on the same program written with JAX's spellings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fdp
from tests.helpers import F64_REL, assert_close

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from fdp.interop.jax import from_jax, to_jax  # noqa: E402


def program(psum, all_gather, axis_index):
    """One replica's code, for either library: static power, dict argument, collectives."""

    def f(power, batch, table):
        x = batch["x"] ** power + table["shift"]
        return {"centered": x - psum(x, "dp") / psum(1, "dp"),
                "gathered": all_gather(batch["x"].sum(), "dp"), "index": axis_index("dp")}

    return f


@pytest.mark.parametrize("n", [1, 3, 8])
def test_static_args_prefixes_and_collectives_match_jax_pmap(host_devices, n):
    x = torch.randn(n, 4, dtype=torch.float64)
    table = {"shift": torch.randn(4, dtype=torch.float64)}
    batch = {"x": x, "unused": torch.zeros(n)}
    in_axes = (None, {"x": 0, "unused": 0}, None)  # dict prefix in another order than JAX's
    out_axes = {"index": 0, "gathered": None, "centered": 0}

    ours = fdp.pmap(program(fdp.psum, fdp.all_gather, fdp.axis_index), fdp.Mesh(n),
                    in_axes=in_axes, out_axes=out_axes, static_broadcasted_argnums=0)(
        3, batch, table)
    with jax.enable_x64(True):
        theirs = jax.pmap(program(jax.lax.psum, jax.lax.all_gather, jax.lax.axis_index),
                          axis_name="dp", in_axes=in_axes, out_axes=out_axes,
                          static_broadcasted_argnums=0, devices=host_devices[:n])(
            3, *jax.tree_util.tree_map(np.asarray, to_jax((batch, table))))
        theirs["index"] = theirs["index"].astype(jnp.int64)  # lax.axis_index is int32
        theirs = from_jax(jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), theirs),
                          like=ours)
    assert_close(ours, theirs, F64_REL)
