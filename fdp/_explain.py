"""torch's raw errors from inside a replica, explained in fdp's terms.

A user who calls :func:`fdp.value_and_grad` never called ``torch.func.vmap``, so vmap's own
messages (BatchNorm statistics, randomness modes) and torch's dtype or arity errors say little
about what to change. Each function here looks at an error that already happened (so the fast
path pays nothing) and returns fdp's error naming the argument, the key path and the fix, or
``None`` when the error is not one it knows.

This module imports nothing else from fdp, so that any module can use it.
"""

from __future__ import annotations

import inspect
import linecache
import re
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
from torch import nn

__all__ = ["arity", "batchnorm_stats", "dtype_mismatch", "forward_ad", "forward_ad_in_threads",
           "one_row_batchnorm", "randomness"]

_BATCHED_STATS = "Batch norm got a batched tensor"
_RANDOM = "random operation while in randomness error mode"
_ONE_ROW = "Expected more than 1 value per channel"
_DTYPE = re.compile(r"same dtype|expected scalar type|should be the same|dtype.* != |"
                    r"found dtype|expected both vectors to have same dtype", re.IGNORECASE)
_OP = re.compile(r"aten::\w+(?:\.\w+)?")


def _frames(error: BaseException) -> Iterator[FrameType]:
    """The frames of ``error``'s traceback, outermost first."""
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _module_name(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _batchnorm_layer(error: BaseException) -> tuple[str, str] | None:
    """``(name, class)`` of the BatchNorm layer that raised, where the traceback tells."""
    frames = list(_frames(error))
    layer = next((f.f_locals.get("self") for f in reversed(frames)
                  if _module_name(f) == "torch.nn.modules.batchnorm"
                  and isinstance(f.f_locals.get("self"), nn.Module)), None)
    if layer is None:
        return None
    for frame in frames:  # the outermost module that holds it names it best
        for candidate in (frame.f_locals.get("module"), frame.f_locals.get("self")):
            if isinstance(candidate, nn.Module) and candidate is not layer:
                name = next((n for n, m in candidate.named_modules() if m is layer), None)
                if name:
                    return name, type(layer).__name__
    return "", type(layer).__name__


def _layer_text(error: BaseException) -> str:
    found = _batchnorm_layer(error)
    if found is None:
        return "a BatchNorm layer"
    name, kind = found
    if not name:
        return f"a {kind} layer"
    return (f"the {kind} layer {name!r} (buffers[{name + '.running_mean'!r}], "
            f"buffers[{name + '.running_var'!r}])")


def batchnorm_stats(error: BaseException, fn: str, fix: str) -> ValueError | None:
    """vmap's "Batch norm got a batched tensor": a training-mode BatchNorm whose running
    statistics are shared by the replicas; ``fix`` says what to pass."""
    if _BATCHED_STATS not in str(error):
        return None
    return ValueError(
        f"{fn}: {_layer_text(error)} runs in training mode and updates its running statistics "
        f"in place, but every replica computes its own batch statistics. {fix}"
    )


def one_row_batchnorm(error: BaseException, fn: str, total: int,
                      sizes: tuple[int, ...]) -> ValueError | None:
    """torch's "Expected more than 1 value per channel": a shard of one row in training."""
    if not isinstance(error, ValueError) or _ONE_ROW not in str(error):
        return None
    return ValueError(
        f"{fn}: {_layer_text(error)} in training got 1 row per channel on a replica (the "
        f"batch of {total} splits into {sizes}); per-replica batch statistics need at least 2 "
        f"rows. Use buffer_policy='sync' with fdp.nn.convert_sync_batchnorm(module) "
        f"(statistics over the whole batch), a larger batch, or eval mode"
    )


def _drawing_op(error: BaseException) -> str:
    """Where the random op that vmap refused ran: torch's function and the user's line."""
    named = _OP.search(str(error))
    frames = list(_frames(error))
    inner = frames[-1] if frames else None
    op = named.group(0) if named else (
        f"{_module_name(inner)}.{inner.f_code.co_name}"
        if inner is not None and _module_name(inner).startswith("torch") else None)
    user = next((f for f in reversed(frames)
                 if not _module_name(f).startswith(("torch", "fdp"))), None)
    where = "" if user is None else _line(user)
    if op and where:
        return f"{op}, called at {where},"
    return op or (f"the op at {where}" if where else "an op")


def _line(frame: FrameType) -> str:
    """``file:line`` of ``frame``, with the code on it where the source is at hand."""
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return f"{where} `{code}`" if code else where


def randomness(error: BaseException, fn: str, fix: str) -> ValueError | None:
    """vmap's "called random operation while in randomness error mode"."""
    if _RANDOM not in str(error):
        return None
    return ValueError(
        f"{fn}: {_drawing_op(error)} draws random numbers, but randomness='error' (the "
        f"default) refuses torch's own random ops in the replicas. {fix}"
    )


def dtype_mismatch(error: BaseException, fn: str, params: list[tuple[str, torch.Tensor]],
                   batch: list[tuple[str, torch.Tensor]]) -> TypeError | None:
    """torch's dtype errors (``mat1 and mat2 must have the same dtype``, ``expected scalar
    type Double but found Float``) when a floating batch leaf has another dtype than the
    floating params."""
    if not isinstance(error, RuntimeError) or not _DTYPE.search(str(error)):
        return None
    floats = [(p, x) for p, x in params if x.is_floating_point()]
    dtypes = {x.dtype for _, x in floats}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    odd = next(((p, x) for p, x in batch if x.is_floating_point() and x.dtype != dtype), None)
    if odd is None:
        return None
    path, leaf = odd
    short = {torch.float64: ".double() or ", torch.float32: ".float() or "}.get(dtype, "")
    return TypeError(
        f"{fn}: {path} is {leaf.dtype} but the params are {dtype} (e.g. {floats[0][0]}); torch "
        f"needs one dtype ({str(error).splitlines()[0]}). Cast the batch leaf with "
        f"{short}.to({dtype}), or the params to {leaf.dtype}"
    )


def _binds(fn: Callable[..., Any], count: int) -> bool | None:
    """Whether ``fn`` accepts ``count`` positional arguments (``None``: cannot tell)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def arity(error: BaseException, fn: str, loss: Callable[..., Any], count: int,
          expected: str) -> TypeError | None:
    """A ``TypeError`` from calling ``loss`` with ``count`` positional arguments it does not
    take; ``expected`` is the signature the options call for."""
    if not isinstance(error, TypeError) or _binds(loss, count) is not False:
        return None
    name = getattr(loss, "__name__", type(loss).__name__)
    try:
        have = f"{name}{inspect.signature(loss)}"
    except (TypeError, ValueError):
        have = name
    return TypeError(f"{fn}: loss_fn is {have}, but {expected}")


_PMAP_STATS_FIX = ("Map the buffers too (pass fdp.replicate(buffers, mesh) with in_axes=0, so "
                   "each replica updates its own copy), use fdp.value_and_grad or "
                   "fdp.DataParallel with buffer_policy=, or eval mode (module.eval())")
_PMAP_RANDOM_FIX = ("Pass fdp.pmap(fn, mesh, randomness='different') (each replica draws its "
                    "own values) or randomness='same', or draw with fdp.random keys (keyed "
                    "layers: fdp.nn.convert_dropout(module))")


def in_pmap(error: BaseException) -> ValueError | None:
    """fdp.pmap's explanation of a raw error from ``fn``'s replicas."""
    return (batchnorm_stats(error, "pmap", _PMAP_STATS_FIX)
            or randomness(error, "pmap", _PMAP_RANDOM_FIX))


def in_module(error: BaseException, layout: Any, params: dict[str, torch.Tensor],
              inputs: list[tuple[str, torch.Tensor]]) -> Exception | None:
    """fdp.DataParallel's explanation of a raw error from its replicas (``layout``: the
    split of the batch, an :class:`fdp.Layout`); ``error`` may be fdp.pmap's explanation."""
    raw = error.__cause__ if error.__cause__ is not None else error
    params_pairs = [(f"module.{k}", v) for k, v in params.items()]
    return (one_row_batchnorm(raw, "DataParallel", layout.total, layout.sizes)
            or dtype_mismatch(raw, "DataParallel", params_pairs, inputs)
            or randomness(raw, "DataParallel",
                          "Pass DataParallel(module, mesh, randomness='different') (the "
                          "default) or 'same', or draw with fdp.random keys (keyed layers: "
                          "fdp.nn.convert_dropout(module))"))


_FORWARD_AD = re.compile(r"forward AD|forward mode AD|forward grad|dual Tensor", re.IGNORECASE)
_FORWARD_AD_REFUSED = "on a threads mesh: torch keeps forward-mode AD state"


def forward_ad_in_threads(what: str) -> RuntimeError:
    """The threads mesh's refusal of forward-mode AD in its replicas (``what`` ran there)."""
    return RuntimeError(
        f"{what} {_FORWARD_AD_REFUSED} (its dual levels) process-wide, so replica threads that "
        f"run it at the same time corrupt each other's tangents (torch's forward-AD level "
        f"errors, or wrong numbers). Use a vmap mesh, fdp.Mesh(n), for torch.func.jvp, "
        f"jacfwd or hessian inside pmap, or reverse mode (torch.func.grad, vjp, jacrev) on "
        f"this mesh"
    )


def forward_ad(error: BaseException) -> BaseException | None:
    """A threads-mesh replica's error caused by forward-mode AD in the replica threads: fdp's
    refusal as it is, torch's raw forward-AD level errors explained (``None``: another)."""
    if _FORWARD_AD_REFUSED in str(error):
        return error
    if not isinstance(error, RuntimeError) or not _FORWARD_AD.search(str(error)):
        return None
    better = forward_ad_in_threads("forward-mode AD (torch.func.jvp, jacfwd, hessian, "
                                   "torch.autograd.forward_ad) ran in the replicas")
    better.__cause__ = error
    return better
