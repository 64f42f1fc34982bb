"""JAX as an independent oracle: fdp's data-parallel loss and gradients equal JAX's.

The same MLP and CNN weights are written as pure JAX functions. JAX's data-parallel step is the
textbook one: the batch is padded to ``[N, S, ...]`` with a mask, each replica computes the
gradient of its masked share of the loss, and ``lax.pmean``/``lax.psum`` combine them, under
``jax.vmap(..., axis_name=...)`` and under ``jax.pmap`` over forced host devices. fdp's side is
``fdp.value_and_grad`` on the vmap backend with the same (possibly uneven) split. float64 on
both sides (JAX with x64), shapes drawn by hypothesis, N <= 8, B <= 64.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fdp
from tests.helpers import F64_REL, assert_close, batch_sizes, mesh_sizes, splits

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
lax = jax.lax

from fdp.interop.jax import from_jax, to_jax  # noqa: E402

AXIS = "dp"


# --- the models, in torch and in JAX ---------------------------------------------------------

def torch_mlp(d: int, h: int, c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))


def jax_mlp(p: dict, x: Any) -> Any:
    hidden = jnp.tanh(x @ p["0.weight"].T + p["0.bias"])
    return hidden @ p["2.weight"].T + p["2.bias"]


def torch_cnn(channels: int, height: int, width: int, c: int) -> nn.Module:
    flat = channels * ((height - 2) // 2) * ((width - 2) // 2)
    return nn.Sequential(nn.Conv2d(1, channels, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(flat, c))


def jax_cnn(p: dict, x: Any) -> Any:
    h = lax.conv_general_dilated(x, p["0.weight"], (1, 1), "VALID",
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = jax.nn.relu(h + p["0.bias"][None, :, None, None])
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return h.reshape(h.shape[0], -1) @ p["4.weight"].T + p["4.bias"]


def per_example_ce(logits: Any, y: Any) -> Any:
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]


# --- the JAX data-parallel step ---------------------------------------------------------------

def split_sizes(rule: Any, b: int, n: int) -> list[int]:
    """The split rules of fdp.scatter, written again here (the oracle must not reuse fdp's)."""
    if rule == "chunk":  # torch.chunk: ceil(b / n) rows per piece until the rows run out
        step = -(-b // n)
        return [max(0, min(step, b - i * step)) for i in range(n)]
    if rule == "even":
        return [b // n + (i < b % n) for i in range(n)]
    return list(rule)


def pad(batch: dict, sizes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[N, S, ...]`` inputs (zero rows as padding) and the ``[N, S]`` mask of real rows.

    NumPy on the host: eager JAX ops would each compile for every drawn shape.
    """
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    width = max(sizes)
    xs = np.zeros((len(sizes), width, *x.shape[1:]), x.dtype)
    ys = np.zeros((len(sizes), width), y.dtype)
    mask = np.zeros((len(sizes), width), bool)
    for i, (start, size) in enumerate(zip(itertools.accumulate([0, *sizes]), sizes,
                                          strict=False)):
        xs[i, :size], ys[i, :size], mask[i, :size] = x[start:start + size], y[start:start + size], 1
    return xs, ys, mask


def replica_step(apply: Callable, collective: str) -> Callable:
    """One replica: the gradient of its masked share of the loss, combined by a collective."""

    def step(params: dict, x: Any, y: Any, mask: Any) -> tuple[Any, Any]:
        total = lax.psum(jnp.sum(mask.astype(x.dtype)), AXIS)
        scale = lax.psum(1, AXIS) if collective == "pmean" else 1

        def local(p: dict) -> Any:
            losses = per_example_ce(apply(p, x), y)
            return jnp.sum(jnp.where(mask, losses, 0.0)) * scale / total

        loss, grads = jax.value_and_grad(local)(params)
        reduce = getattr(lax, collective)
        return reduce(loss, AXIS), reduce(grads, AXIS)

    return step


def jax_dp(apply: Callable, params: dict, batch: dict, sizes: list[int], transform: str,
           collective: str, devices: list | None = None) -> tuple[Any, Any]:
    """JAX's data-parallel loss and gradients (replica 0's copy; all replicas are checked)."""
    x, y, mask = pad(batch, sizes)
    step = replica_step(apply, collective)
    if transform == "vmap":
        mapped = jax.jit(jax.vmap(step, in_axes=(None, 0, 0, 0), axis_name=AXIS))
    else:
        mapped = jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, 0, 0),
                          devices=devices[: len(sizes)])
        # arrays from DLPack are committed to one device, which jax.pmap refuses: host views
        params = jax.tree_util.tree_map(np.asarray, params)
    stacked = jax.tree_util.tree_map(np.asarray, mapped(params, x, y, mask))
    for leaf in jax.tree_util.tree_leaves(stacked):  # every replica holds the same values
        assert (leaf == leaf[:1]).all()
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v[0]), stacked)


# --- the comparison ---------------------------------------------------------------------------

def check_against_jax(module: nn.Module, apply: Callable, batch: dict, n: int, split: Any,
                      transform: str, collective: str, devices: list | None = None,
                      single: bool = False) -> None:
    """fdp's DP loss/grads == JAX's DP step (and, with ``single``, == JAX's full-batch step)."""
    model = fdp.functionalize(module.double())

    def loss_fn(params: dict, b: dict) -> torch.Tensor:
        out, _ = model.apply(params, model.buffers, b["x"])
        return nn.functional.cross_entropy(out, b["y"])

    loss, grads = fdp.value_and_grad(loss_fn, fdp.Mesh(n), split=split)(model.params, batch)
    ours = {"loss": loss, "grads": grads}
    sizes = split_sizes(split, batch["y"].shape[0], n)
    assert sum(sizes) == batch["y"].shape[0] and len(sizes) == n
    with jax.enable_x64(True):
        params, jbatch = to_jax(model.params), to_jax(batch)
        ref_loss, ref_grads = jax_dp(apply, params, jbatch, sizes, transform, collective,
                                     devices)
        ref = from_jax({"loss": ref_loss, "grads": ref_grads}, like=ours)
        if single:
            full = jax.jit(jax.value_and_grad(
                lambda p, b: jnp.mean(per_example_ce(apply(p, b["x"]), b["y"]))))(params, jbatch)
            assert_close(from_jax({"loss": full[0], "grads": full[1]}, like=ours), ref, F64_REL)
    assert_close(ours, ref, F64_REL)
    RELATIVE_ERRORS.append(max_relative_error(ours, ref))


RELATIVE_ERRORS: list[float] = []  # what the tests measured (see docs/jax.md)


def max_relative_error(actual: dict, expected: dict) -> float:
    """Max over leaves of max|a - e| / max|e| (the measure assert_close bounds)."""
    pairs = zip(fdp.tree.flatten(actual)[0], fdp.tree.flatten(expected)[0], strict=True)
    return max(((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()
               for a, e in pairs if e.numel())


def mlp_case(draw: Any, b: int) -> tuple[nn.Module, Callable, dict]:
    d, h, c = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(2, 4))
    batch = {"x": torch.randn(b, d, dtype=torch.float64), "y": torch.randint(0, c, (b,))}
    return torch_mlp(d, h, c), jax_mlp, batch


def cnn_case(draw: Any, b: int) -> tuple[nn.Module, Callable, dict]:
    ch, c = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    height, width = draw(st.integers(4, 9)), draw(st.integers(4, 9))
    batch = {"x": torch.randn(b, 1, height, width, dtype=torch.float64),
             "y": torch.randint(0, c, (b,))}
    return torch_cnn(ch, height, width, c), jax_cnn, batch


CASES = {"mlp": mlp_case, "cnn": cnn_case}


@pytest.mark.parametrize("model", sorted(CASES))
@settings(max_examples=min(settings().max_examples, 30))  # JAX compiles every new shape: ~3 s each
@given(n=mesh_sizes, b=batch_sizes, data=st.data(), transform=st.sampled_from(["vmap", "pmap"]),
       collective=st.sampled_from(["pmean", "psum"]))
def test_dp_loss_and_grads_equal_jax(host_devices, model, n, b, data, transform, collective):
    module, apply, batch = CASES[model](data.draw, b)
    check_against_jax(module, apply, batch, n, data.draw(splits(b, n)), transform, collective,
                      host_devices)


@pytest.mark.parametrize("transform", ["vmap", "pmap"])
@pytest.mark.parametrize("model", sorted(CASES))
def test_uneven_splits_with_empty_replicas(host_devices, model, transform):
    """B=5 over 8 replicas ("chunk": 1, 1, 1, 1, 1, 0, 0, 0), against JAX's full batch too."""
    draw = {"mlp": [4, 6, 3], "cnn": [2, 3, 6, 7]}[model]
    module, apply, batch = CASES[model](lambda _: draw.pop(0), 5)
    check_against_jax(module, apply, batch, 8, "chunk", transform,
                      "psum" if transform == "pmap" else "pmean", host_devices, single=True)
