"""The ``jax`` benchmark section: fdp's compiled DP step against jitted JAX on the same MLP.

Three candidates, timed interleaved in one run, on the same weights and batch (shared with JAX
through :mod:`fdp.interop.jax`, zero-copy):

- ``fdp``: ``torch.compile(fdp.value_and_grad(loss, Mesh(n)))``, the vmap backend;
- ``jax_single``: ``jax.jit(jax.value_and_grad(loss))`` on one device, the usual JAX step;
- ``jax_vmap``: ``jax.jit`` of ``jax.vmap(..., axis_name="dp")`` over ``n`` replicas with
  ``lax.pmean`` of the per-replica loss and gradients: JAX's data-parallel step on one device.

JAX is optional: :func:`missing` says why the section cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fdp.bench import _models

AXIS = "dp"


def missing() -> str | None:
    """None when JAX can be imported, else the note to print instead of the section."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return "skipped: JAX is not installed (pip install fdp[jax])"
    return None


def _mlp(jnp: Any, params: dict, x: Any) -> Any:
    """The workload's ``nn.Sequential`` MLP (Linear, ReLU, Linear, ReLU, Linear) in JAX."""
    h = x
    for i in (0, 2):
        h = jnp.maximum(h @ params[f"{i}.weight"].T + params[f"{i}.bias"], 0.0)
    return h @ params["4.weight"].T + params["4.bias"]


def _loss(jax: Any, params: dict, x: Any, y: Any) -> Any:
    """Mean cross-entropy, as ``nn.functional.cross_entropy`` computes it."""
    logits = _mlp(jax.numpy, params, x)
    picked = jax.numpy.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return jax.numpy.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def jax_steps(w: _models.Workload, n: int) -> tuple[dict[str, Callable[[], Any]], dict]:
    """The jitted JAX steps, each run once (compiled outside any timing), and JAX's gradients."""
    import jax

    from fdp.interop.jax import to_jax

    params = to_jax(w.params())
    batch = to_jax(w.batch, downcast=True)  # int64 labels -> int32 (JAX's default mode)
    x, y = batch["x"], batch["y"]

    def loss(p: dict, x: Any, y: Any) -> Any:
        return _loss(jax, p, x, y)

    def replica(p: dict, x: Any, y: Any) -> tuple[Any, Any]:
        value, grads = jax.value_and_grad(loss)(p, x, y)
        return jax.lax.pmean(value, AXIS), jax.lax.pmean(grads, AXIS)

    def data_parallel(p: dict, x: Any, y: Any) -> tuple[Any, Any]:
        xs, ys = x.reshape(n, -1, *x.shape[1:]), y.reshape(n, -1)
        out = jax.vmap(replica, in_axes=(None, 0, 0), axis_name=AXIS)(p, xs, ys)
        return jax.tree_util.tree_map(lambda v: v[0], out)

    single = jax.jit(jax.value_and_grad(loss))
    vmapped = jax.jit(data_parallel)
    steps = {"jax_single": lambda: jax.block_until_ready(single(params, x, y)),
             "jax_vmap": lambda: jax.block_until_ready(vmapped(params, x, y))}
    grads = steps["jax_single"]()[1]
    steps["jax_vmap"]()
    return steps, grads


def candidates(n: int) -> tuple[_models.Workload, dict[str, Callable[[], Any]], float]:
    """The MLP workload, the three steps (compiled), and the largest relative difference
    between fdp's and JAX's gradients (a float32 sanity check, expected ~1e-6)."""
    from fdp.interop.jax import from_jax

    w = _models.mlp()
    if w.batch["x"].shape[0] % n:
        raise ValueError(f"jax bench: the batch must split evenly over n={n} replicas")
    steps, jax_grads = jax_steps(w, n)
    fdp_step = _models.dp_step(w, n, compiled=True)
    _, grads = fdp_step()
    ref = from_jax(jax_grads, like=grads)
    diff = max(((grads[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in grads)
    return w, {"fdp": fdp_step, **steps}, diff
