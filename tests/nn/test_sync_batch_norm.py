"""Law: DP with sync_batch_norm == single-device batch norm on the whole batch (issue 4, item 2).

Outputs, input/weight/bias gradients, running statistics and ``num_batches_tracked`` are
compared with ``torch.nn.functional.batch_norm`` on the concatenated batch, through
``fdp.pmap`` over ``fdp.scatter``ed inputs (every split rule, zero-row replicas included).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

import fdp
import fdp.nn
from tests.helpers import F32_REL, F64_REL, assert_close, assert_unchanged, snapshot, splits

C = 3
SPATIAL = {"1d": (), "1d-seq": (4,), "2d": (3, 2), "3d": (2, 2, 2)}


def _inputs(kind: str, b: int, dtype: torch.dtype, affine: bool, offset: float = 0.0) -> dict:
    x = torch.randn(b, C, *SPATIAL[kind], dtype=dtype) * 2 + offset
    state = {
        "x": x.requires_grad_(),
        "running_mean": torch.randn(C, dtype=dtype),
        "running_var": torch.rand(C, dtype=dtype) + 0.5,
        "weight": (torch.randn(C, dtype=dtype) if affine else None),
        "bias": (torch.randn(C, dtype=dtype) if affine else None),
        "num_batches_tracked": torch.tensor(3),
    }
    for k in ("weight", "bias"):
        if state[k] is not None:
            state[k].requires_grad_()
    return state


def _grads(out: torch.Tensor, cot: torch.Tensor, s: dict) -> list:
    wrt = [s[k] for k in ("x", "weight", "bias") if s[k] is not None]
    return list(torch.autograd.grad((out * cot).sum(), wrt))


def _reference(s: dict, momentum: float | None, eps: float, cot: torch.Tensor):
    """Single-device torch on the whole batch (as torch's _BatchNorm computes the factor)."""
    rm, rv = s["running_mean"].clone(), s["running_var"].clone()
    nbt = s["num_batches_tracked"] + 1
    factor = momentum if momentum is not None else 1.0 / float(nbt)
    out = F.batch_norm(s["x"], rm, rv, s["weight"], s["bias"], True, factor, eps)
    return out, rm, rv, nbt, _grads(out, cot, s)


def _data_parallel(s: dict, mesh: fdp.Mesh, split, momentum, eps, cot, replicated: bool):
    """pmap over the scattered batch; buffers replicated (in_axes 0) or broadcast (None)."""

    def step(x, running_mean, running_var, weight, bias, nbt):
        return fdp.nn.sync_batch_norm(x, running_mean, running_var, weight, bias,
                                      momentum=momentum, eps=eps, num_batches_tracked=nbt)

    buffers = (s["running_mean"], s["running_var"])
    if replicated:
        buffers = fdp.replicate(buffers, mesh)
    nbt = fdp.replicate(s["num_batches_tracked"], mesh) if replicated else \
        s["num_batches_tracked"]
    axis = 0 if replicated else None
    sharded = fdp.scatter(s["x"], mesh, split=split)
    res = fdp.pmap(step, mesh, in_axes=(0, axis, axis, None, None, axis))(
        sharded, *buffers, s["weight"], s["bias"], nbt)
    per_replica = res.data
    assert torch.isfinite(per_replica.out).all()  # padding rows, zero-row replicas included
    out = fdp.gather(fdp.Sharded(per_replica.out, res.layout), mesh)
    stats = [per_replica.running_mean, per_replica.running_var,
             per_replica.num_batches_tracked]
    for t in stats:  # every replica holds the same new statistics
        assert torch.equal(t, t[:1].expand_as(t))
    grads = _grads(out, cot, s)
    assert all(torch.isfinite(g).all() for g in grads)
    return out, *(t[0] for t in stats), grads


def _check(kind, n, b, split, affine, momentum, dtype, rel, replicated, offset=0.0, eps=1e-5):
    s = _inputs(kind, b, dtype, affine, offset)
    cot = torch.randn(b, C, *SPATIAL[kind], dtype=dtype)
    before = snapshot({k: v for k, v in s.items()})
    expected = _reference(s, momentum, eps, cot)
    actual = _data_parallel(s, fdp.Mesh(n), split, momentum, eps, cot, replicated)
    names = ["out", "running_mean", "running_var", "num_batches_tracked", "grads"]
    actual, expected = (dict(zip(names, r, strict=True)) for r in (actual, expected))
    if b * s["x"][0, 0].numel() == 2:  # two values per channel: see _two_values_grad_scale
        scale = _two_values_grad_scale(s, cot, eps)
        err = (actual["grads"].pop(0) - expected["grads"].pop(0)).abs().max().item()
        assert err <= rel * scale, f"grad x: max abs err {err:.3e} > {rel:g} * {scale:.3e}"
    assert_close(actual, expected, rel)
    assert_unchanged(before, s)


def _two_values_grad_scale(s: dict, cot: torch.Tensor, eps: float) -> float:
    """The scale of the terms whose cancellation is the input gradient.

    With two values per channel, x̂ = ±d/√(d² + ε): the input gradient is
    w·rstd·(g - mean(g) - x̂·mean(g·x̂)), where the bracket cancels down to O(ε/d²) of its
    terms, so the gradient is ~1e-7 of |g|·|w|·rstd and both torch and fdp hold it only to
    rounding of those terms. Errors are measured against that scale here; for three or more
    values per channel the gradient is of the terms' own size and compared as everything else.
    """
    x = s["x"].detach()
    dims = [0, *range(2, x.dim())]
    rstd = torch.rsqrt(x.var(dims, unbiased=False) + eps)
    w = torch.ones_like(rstd) if s["weight"] is None else s["weight"].detach().abs()
    shape = (1, -1, *([1] * (x.dim() - 2)))
    return (cot.abs() * (w * rstd).reshape(shape)).max().item()


@given(n=st.integers(1, 8), b=st.integers(2, 24), data=st.data(),
       kind=st.sampled_from(list(SPATIAL)), affine=st.booleans(),
       momentum=st.sampled_from([0.1, None, 0.7]), replicated=st.booleans(),
       offset=st.sampled_from([0.0, 10.0]))
def test_dp_equals_single_device_float64(n, b, data, kind, affine, momentum, replicated,
                                         offset):
    _check(kind, n, b, data.draw(splits(b, n)), affine, momentum, torch.float64, F64_REL,
           replicated, offset)


@given(n=st.integers(1, 8), b=st.integers(8, 24), data=st.data(),
       kind=st.sampled_from(list(SPATIAL)), affine=st.booleans(),
       momentum=st.sampled_from([0.1, None]))
def test_dp_equals_single_device_float32(n, b, data, kind, affine, momentum):
    _check(kind, n, b, data.draw(splits(b, n)), affine, momentum, torch.float32, F32_REL,
           replicated=False)


@pytest.mark.parametrize("split", [[0, 2, 0, 1], [1, 0, 1, 1], "chunk"])
def test_tiny_batches_with_empty_replicas(split):
    """Three rows over four replicas: empty and one-row replicas, BN1d (the edge of B ≥ 2)."""
    _check("1d", 4, 3, split, True, None, torch.float64, F64_REL, replicated=True)


@pytest.mark.parametrize("split", [[1, 1], [2, 0, 0], [0, 1, 0, 1], "chunk"])
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_two_values_per_channel(split, offset):
    """B = 2, BN1d: the smallest batch; the input gradient is nearly all cancellation."""
    n = 1 if split == "chunk" else len(split)
    _check("1d", n, 2, split, True, 0.1, torch.float64, F64_REL, True, offset)


def test_outside_pmap_is_single_device_batch_norm():
    s = _inputs("2d", 5, torch.float64, affine=True)
    res = fdp.nn.sync_batch_norm(s["x"], s["running_mean"], s["running_var"], s["weight"],
                                 s["bias"], num_batches_tracked=s["num_batches_tracked"])
    out, rm, rv, nbt, _ = _reference(s, 0.1, 1e-5, torch.zeros_like(s["x"]))
    assert_close(tuple(res), (out, rm, rv, nbt), F64_REL)


@given(n=st.integers(1, 6), b=st.integers(1, 12), data=st.data(), inside=st.booleans())
def test_eval_uses_running_stats(n, b, data, inside):
    s = _inputs("1d-seq", b, torch.float64, affine=True)
    args = (s["running_mean"], s["running_var"], s["weight"], s["bias"])
    expected = F.batch_norm(s["x"], *args, training=False)

    def bn(x):
        return fdp.nn.sync_batch_norm(x, *args, training=False).out

    if inside:
        mesh = fdp.Mesh(n)
        out = fdp.gather(fdp.pmap(bn, mesh)(fdp.scatter(s["x"], mesh,
                                                        split=data.draw(splits(b, n)))), mesh)
    else:
        out = bn(s["x"])
    assert_close(out, expected, F64_REL)
    res = fdp.nn.sync_batch_norm(s["x"], *args, training=False, num_batches_tracked=s[
        "num_batches_tracked"])
    assert res.running_mean is args[0] and res.num_batches_tracked is s["num_batches_tracked"]


@given(b=st.integers(2, 12), data=st.data())
def test_explicit_mask_selects_rows(b, data):
    """mask= outside pmap: the statistics are those of the selected rows only."""
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    if keep.sum() < 2:
        keep[:2] = True
    x = torch.randn(b, C, 2, dtype=torch.float64)
    res = fdp.nn.sync_batch_norm(x, torch.zeros(C, dtype=torch.float64),
                                 torch.ones(C, dtype=torch.float64), None, None, mask=keep)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    expected = F.batch_norm(x[keep], rm, rv, training=True)
    assert_close((res.out[keep], res.running_mean, res.running_var), (expected, rm, rv),
                 F64_REL)


def test_explicit_mask_overrides_the_scatter_mask():
    """Inside pmap, mask= (here: every other real row) replaces the padding mask."""
    mesh, x = fdp.Mesh(3), torch.randn(7, C, dtype=torch.float64)
    sharded = fdp.scatter(x, mesh, split="even")  # 3, 2, 2: padded
    keep = sharded.mask & (torch.arange(3) % 2 == 0)
    f = fdp.pmap(lambda x, m: fdp.nn.sync_batch_norm(x, None, None, None, None, mask=m).out,
                 mesh)
    out = fdp.gather(f(sharded, keep), mesh)
    rows = fdp.gather(fdp.Sharded(keep, sharded.layout), mesh)
    assert_close(out[rows], F.batch_norm(x[rows], None, None, training=True), F64_REL)


def test_bn2d_with_one_row_per_batch_is_fine():
    """One row but several spatial positions: more than one value per channel (as torch)."""
    mesh, x = fdp.Mesh(2), torch.randn(1, C, 2, 2, dtype=torch.float64)
    f = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x, None, None, None, None).out, mesh)
    out = fdp.gather(f(fdp.scatter(x, mesh)), mesh)
    assert_close(out, F.batch_norm(x, None, None, training=True), F64_REL)


# --- bad input ----------------------------------------------------------------------------------

ONE_VALUE = "more than 1 value per channel in training"


@pytest.mark.parametrize("split", [None, [1], [1, 0, 0, 0], [0, 0, 1]])
def test_batch_of_one_in_training_raises(split):
    x = torch.randn(1, C)
    if split is None:
        with pytest.raises(ValueError, match=ONE_VALUE):
            fdp.nn.sync_batch_norm(x, None, None, None, None)
        return
    mesh = fdp.Mesh(len(split))
    f = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x, None, None, None, None).out, mesh)
    with pytest.raises(ValueError, match=ONE_VALUE + "; got 1 "):
        f(fdp.scatter(x, mesh, split=split))


def test_one_row_per_replica_is_enough_over_replicas():
    """torch's BN raises for a one-row batch; two replicas of one row each are two values."""
    mesh, x = fdp.Mesh(2), torch.randn(2, C, dtype=torch.float64)
    f = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x, None, None, None, None).out, mesh)
    assert_close(fdp.gather(f(fdp.scatter(x, mesh)), mesh),
                 F.batch_norm(x, None, None, training=True), F64_REL)


def _call(x=None, rm=None, rv=None, w=None, b=None, **kw):
    x = torch.randn(4, C) if x is None else x
    return fdp.nn.sync_batch_norm(x, rm, rv, w, b, **kw)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(x=torch.ones(4, C, dtype=torch.int64)), TypeError, "x must be floating point"),
    (dict(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(4)), ValueError, r"batch and a channel dim"),
    (dict(w=torch.ones(C + 1)), ValueError, r"weight has shape \(4,\) but x has 3 channels"),
    (dict(b=torch.ones(1, C)), ValueError, r"bias has shape \(1, 3\)"),
    (dict(rm=torch.zeros(2), rv=torch.ones(2)), ValueError, "running_mean has shape"),
    (dict(rm=torch.zeros(C)), ValueError, "both running_mean and running_var"),
    (dict(rm=torch.zeros(C), rv=torch.ones(C), momentum=None), ValueError,
     "momentum=None .* needs num_batches_tracked"),
    (dict(training=False), ValueError, "training=False normalizes with the running"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, r"mask has shape \(3,\)"),
    (dict(mask=torch.ones(4)), TypeError, "mask must be a bool tensor"),
    (dict(eps=-1.0), ValueError, "eps must be a non-negative"),
    (dict(momentum="0.1"), TypeError, "momentum must be a float"),
    (dict(axis_name=0), TypeError, "axis_name must be a str"),
    (dict(rm=torch.zeros(C), rv=torch.ones(C), num_batches_tracked=3), TypeError,
     "num_batches_tracked must be a scalar tensor"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_unknown_axis_name_inside_pmap():
    mesh = fdp.Mesh(2)
    f = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x, None, None, None, None,
                                                  axis_name="batch").out, mesh)
    with pytest.raises(ValueError, match="unknown axis name 'batch'"):
        f(fdp.scatter(torch.randn(4, C), mesh))


def test_scatter_mask_that_does_not_fit_x_raises():
    mesh = fdp.Mesh(2)
    f = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x.reshape(-1, C), None, None, None,
                                                  None).out, mesh)
    with pytest.raises(ValueError, match=r"the row mask of the uneven fdp\.scatter.*pass mask="):
        f(fdp.scatter(torch.randn(5, 2, C), mesh))


# --- transforms and axis names ------------------------------------------------------------------

def test_torch_func_grad_through_pmap_equals_autograd():
    """torch.func.grad of the whole DP computation (uneven split): the single-device grads."""
    mesh, x = fdp.Mesh(3), torch.randn(7, C, 2, dtype=torch.float64)
    w, cot = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(7, C, 2, dtype=torch.float64)

    def dp_loss(w, x):
        res = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x, None, None, w, None).out, mesh)(
            fdp.scatter(x, mesh, split=[4, 0, 3]))
        return (fdp.gather(res, mesh) * cot).sum()

    def loss(w, x):
        return (F.batch_norm(x, None, None, w, None, training=True) * cot).sum()

    assert_close(torch.func.grad(dp_loss, argnums=(0, 1))(w, x),
                 torch.func.grad(loss, argnums=(0, 1))(w, x), F64_REL)


def test_custom_axis_name():
    mesh, x = fdp.Mesh(2), torch.randn(6, C, dtype=torch.float64)
    synced = fdp.pmap(lambda x: fdp.nn.sync_batch_norm(x, None, None, None, None,
                                                       axis_name="batch").out,
                      mesh, axis_name="batch")
    out = fdp.gather(synced(fdp.scatter(x, mesh)), mesh)
    assert_close(out, F.batch_norm(x, None, None, training=True), F64_REL)
