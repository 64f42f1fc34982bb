"""``fdp.value_and_grad``: the single-device loss and gradient, computed data-parallel."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from fdp import _check, _explain, _inputs, _tree
from fdp._compat import compiling
from fdp._donation import check_not_donated
from fdp._inputs import batch_size
from fdp._layout import Layout, Sharded, split_sizes
from fdp._mesh import Mesh, check_mesh
from fdp.backends._base import GradPlan, Params, SplitLoss
from fdp.backends._options import (
    BufferPolicy,
    Randomness,
    Reduction,
    SplitRule,
    Strategy,
    Unused,
    check_buffer_policy,
    check_randomness,
    check_reduction,
    check_strategy,
    check_unused,
)
from fdp.random import _key_words, key_context

__all__ = ["SplitLoss", "split_loss", "value_and_grad"]


def split_loss(
    forward: Callable[..., Any], criterion: Callable[..., Any]
) -> SplitLoss:
    """Builds a :class:`SplitLoss` (needed by ``value_and_grad(..., strategy="gather")``)."""
    _check.callable_(forward, "split_loss", "forward")
    _check.callable_(criterion, "split_loss", "criterion")
    return SplitLoss(forward, criterion)


def value_and_grad(
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    has_aux: bool = False,
    *,
    strategy: Strategy = "weighted",
    split: SplitRule = "chunk",
    dim: int = 0,
    reduction: Reduction = "mean",
    randomness: Randomness = "error",
    buffer_policy: BufferPolicy | None = None,
    unused: Unused = "zeros",
) -> Callable[..., tuple[Any, Params]]:
    """Data-parallel loss and gradient that equal the single-device ones for any batch and mesh.

    ``loss_fn(params, batch)`` is the loss you would write for one device. The returned function
    takes ``(params, batch, *args)`` with the full batch, splits it by ``split`` and returns
    ``(loss, grads)`` (``((loss, aux), grads)`` with ``has_aux``), where ``loss`` and ``grads``
    are those of ``loss_fn(params, batch)`` up to float rounding. Extra ``args`` (e.g. buffers)
    reach every replica's ``loss_fn(params, shard, *args)`` as they are: not split, and not
    differentiated.

    Args:
        loss_fn: the single-device loss. With ``strategy="gather"`` it must be a
            :class:`SplitLoss` (see :func:`split_loss`).
        mesh: the mesh.
        has_aux: ``loss_fn`` returns ``(loss, aux)``. With ``"weighted"``, ``aux`` comes back
            stacked over the replicas that received rows; with ``"gather"`` it is the
            criterion's.
        strategy: ``"weighted"`` (each replica's loss weighted by its real row count, then
            summed over replicas: DDP/JAX semantics; exact when the loss is a mean — or with
            ``reduction="sum"`` a sum — of per-example terms) or ``"gather"`` (forward per
            replica, outputs gathered, one criterion: ``nn.DataParallel`` semantics; exact for
            any criterion).
        split: how a full batch is split (see :func:`fdp.scatter`).
        dim: the batch dimension of every tensor in the batch (and of the forward's outputs
            for ``"gather"``).
        reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over examples (weighted).
        randomness: random ops such as dropout in ``loss_fn``: ``"error"`` (default),
            ``"different"`` (each replica draws its own values) or ``"same"``, as in
            :func:`fdp.pmap`. Values differ from a single-device run's draws, so random layers
            make the result equal to single-device training only in distribution.
        buffer_policy: for models with state that the forward updates (BatchNorm running
            stats): ``"replica0"``, ``"mean"`` or ``"sync"`` (see
            docs/training.md). Then ``loss_fn(params, buffers, batch)`` returns
            ``(loss, new_buffers)`` (``((loss, aux), new_buffers)`` with ``has_aux``), the
            returned function takes ``(params, buffers, batch, *args)`` and gives
            ``((loss, new_buffers), grads)``. Collectives inside ``loss_fn`` (e.g.
            :class:`fdp.nn.SyncBatchNorm`) see ``mesh.axis_name``.
        unused: the gradient of a parameter the loss does not depend on (unused, or frozen:
            ``requires_grad=False`` in the module that :func:`fdp.functionalize` wrapped):
            ``"zeros"`` (default, ``torch.func.grad``'s) or ``"none"`` (``torch.autograd``'s;
            :mod:`fdp.optim` then leaves the parameter as ``torch.optim`` leaves one whose
            ``.grad`` is ``None``). Under ``torch.compile`` the set of missing gradients
            comes from one eager run per batch shape (a graph break); under ``torch.func``
            transforms the gradient cannot tell, and is zeros.

    The returned function also takes keyword-only ``key`` (an :mod:`fdp.random` key: every
    replica's ``loss_fn`` runs in ``fdp.random.key_context(key)``, so keyed layers such as
    :class:`fdp.nn.Dropout` draw per-example values that equal a single-device run's) and
    ``row_offset`` (the batch's first row in a larger batch; :func:`fdp.accumulate` sets it).

    Example:
        >>> model = fdp.functionalize(torch.nn.Linear(3, 1))
        >>> def loss_fn(params, batch):
        ...     out, _ = model.apply(params, model.buffers, batch["x"])
        ...     return ((out - batch["y"]) ** 2).mean()
        >>> batch = {"x": torch.randn(5, 3), "y": torch.randn(5, 1)}
        >>> loss, grads = fdp.value_and_grad(loss_fn, fdp.Mesh(2))(model.params, batch)
        >>> sorted(grads)
        ['bias', 'weight']
    """
    _check.callable_(loss_fn, "value_and_grad", "loss_fn")
    check_mesh(mesh, "value_and_grad")
    strategy = check_strategy(strategy, "value_and_grad")
    if strategy == "gather" and not isinstance(loss_fn, SplitLoss):
        raise TypeError("value_and_grad: strategy='gather' needs the loss split into a "
                        "per-example forward and a criterion: "
                        "loss_fn=fdp.split_loss(forward, criterion)")
    reduction = check_reduction(reduction, "value_and_grad")
    _check.integer(dim, "value_and_grad", "dim")
    randomness = check_randomness(randomness, "value_and_grad")
    if isinstance(split, str):
        split_sizes(1, 1, split, "value_and_grad")  # validates the rule's name eagerly
    buffer_policy = check_buffer_policy(buffer_policy, "value_and_grad")
    unused = check_unused(unused, "value_and_grad")
    if buffer_policy is not None and strategy == "gather":
        raise ValueError("value_and_grad: buffer_policy works with strategy='weighted' (each "
                         "replica's loss_fn returns its new buffers)")

    split_key = split if isinstance(split, str) else tuple(split)
    device = mesh.backend.home
    probe = _MissingGradients(device) if unused == "none" else None

    def plan_for(params: dict, batch: Any, args: tuple, buffers: Any, key: Any,
                 row_offset: int) -> GradPlan:
        # Fast checks first; the thorough ones (which name key paths) run only on failure.
        if not _params_ok(params, device):
            _check_params(params, mesh)
        rows = _fast_rows(batch, dim, device)
        if rows is None:
            rows = _checked_rows(batch, mesh, dim)
        layout = _layout(rows, mesh.size, split_key, dim)
        if key is not None:
            _key_words(key, "value_and_grad")
        _check.integer(row_offset, "value_and_grad", "row_offset")
        return GradPlan(loss_fn, strategy, has_aux, reduction, layout, dim, args, randomness,
                        buffers, buffer_policy, mesh.axis_name, key, row_offset,
                        None if key is None else _key_scope, unused)

    if buffer_policy is None:
        def run(params: dict[str, torch.Tensor], batch: Any, *args: Any,
                key: torch.Tensor | None = None, row_offset: int = 0) -> tuple[Any, dict]:
            check_not_donated(params, "value_and_grad", "params")
            plan = plan_for(params, batch, args, None, key, row_offset)
            return _missing_as_none(_call_backend(mesh, plan, params, batch), probe, plan,
                                    params, batch)

        return run

    def run_with_buffers(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                         batch: Any, *args: Any, key: torch.Tensor | None = None,
                         row_offset: int = 0) -> tuple[Any, dict]:
        _check.param_dict(buffers, "value_and_grad", "buffers")
        check_not_donated(params, "value_and_grad", "params")
        plan = plan_for(params, batch, args, buffers, key, row_offset)
        return _missing_as_none(_call_backend(mesh, plan, params, batch), probe, plan, params,
                                batch)

    return run_with_buffers


def _call_backend(mesh: Mesh, plan: GradPlan, params: dict, batch: Any) -> tuple[Any, dict]:
    try:
        return mesh.backend.value_and_grad(plan, params, batch)
    except (RuntimeError, ValueError, TypeError) as e:
        better = _explained(e, plan, params, batch)
        if better is None:
            raise
        raise better from e


_BATCHNORM_FIX = ("Pass buffer_policy='replica0', 'mean' or 'sync' (then loss_fn(params, "
                  "buffers, batch) returns (loss, new_buffers); 'sync' with "
                  "fdp.nn.convert_sync_batchnorm(module) gives single-device statistics), or "
                  "put the module in eval mode (module.eval()) before fdp.functionalize")
_RANDOM_FIX = ("Pass randomness='different' (each replica draws its own values) or 'same', or "
               "draw with a key: key=fdp.random.key(seed) with keyed layers "
               "(fdp.nn.convert_dropout(module) converts nn.Dropout), which equal a "
               "single-device run's draws")


def _explained(error: Exception, plan: GradPlan, params: dict, batch: Any) -> Exception | None:
    """fdp's error for a raw torch error from the replicas (``None``: leave it as it is)."""
    fn = "value_and_grad"
    if plan.buffer_policy is None:
        stats_fix = _BATCHNORM_FIX
    else:
        stats_fix = (f"With buffer_policy={plan.buffer_policy!r}, pass the buffers loss_fn "
                     f"receives to model.apply (loss_fn(params, buffers, batch)), not "
                     f"model.buffers")
    return (_explain.one_row_batchnorm(error, fn, plan.layout.total, plan.layout.sizes)
            or _explain.batchnorm_stats(error, fn, stats_fix)
            or _explain.randomness(error, fn, _RANDOM_FIX)
            or _explain.arity(error, fn, plan.loss, len(plan.args) + (
                2 if plan.buffer_policy is None else 3), _expected_call(plan))
            or _explain.dtype_mismatch(error, fn, [(f"params[{k!r}]", v)
                                                   for k, v in params.items()],
                                       _inputs.batch_leaves(batch, fn, "batch")))


def _expected_call(plan: GradPlan) -> str:
    extra = "".join(f", args[{i}]" for i in range(len(plan.args)))
    if plan.buffer_policy is None:
        return (f"with no buffer_policy it is called as loss_fn(params, batch{extra}) and "
                f"returns the loss; a loss_fn(params, buffers, batch) that returns (loss, "
                f"new_buffers) needs buffer_policy='replica0', 'mean' or 'sync'")
    return (f"with buffer_policy={plan.buffer_policy!r} it is called as loss_fn(params, "
            f"buffers, batch{extra}) and must return (loss, new_buffers); drop buffer_policy "
            f"for a loss_fn(params, batch)")


def _missing_as_none(result: tuple[Any, dict], probe: _MissingGradients | None, plan: GradPlan,
                     params: Params, batch: Any) -> tuple[Any, dict]:
    """With ``unused="none"`` under torch.compile (which differentiates with torch.func, where a
    missing gradient is zeros): the gradients an eager run finds missing become ``None``."""
    if probe is None:
        return result
    if not compiling():
        return result
    out, grads = result
    signature = probe.signature(plan, params, batch)
    # dynamo guards on the membership: after the first call (the probe, across a graph break)
    # this frame compiles again and reads the kept answer
    missing = (probe.known[signature] if signature in probe.known
               else probe(plan, params, batch))
    return out, {k: None if k in missing else g for k, g in grads.items()}


class _MissingGradients:
    """Which parameters get no gradient from a plan's loss, found by one eager run per shape.

    torch.compile calls it across a graph break on the first call per batch shape; the code it
    compiles next reads the kept answer (dynamo guards on it), so later calls run whole. The
    run is the loss on the whole batch as one replica (collectives see an axis of size 1), on
    the mesh's home device, with torch's random state restored afterwards.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.known: dict[tuple, frozenset[str]] = {}

    def signature(self, plan: GradPlan, params: Params, batch: Any) -> tuple:
        leaves, treedef = _tree.flatten((batch, plan.args, plan.buffers))
        return (tuple(params), str(treedef), tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves
            if isinstance(x, torch.Tensor | int | float | bool | str | None)))

    @torch.compiler.disable
    def __call__(self, plan: GradPlan, params: Params, batch: Any) -> frozenset[str]:
        signature = self.signature(plan, params, batch)
        missing = self.known.get(signature)
        if missing is None:
            missing = self._keep(signature, self._run(plan, params, batch))
        return missing

    def _keep(self, signature: tuple, missing: frozenset[str]) -> frozenset[str]:
        if len(self.known) > 256:
            self.known.clear()
        self.known[signature] = missing
        return missing

    def _run(self, plan: GradPlan, params: Params, batch: Any) -> frozenset[str]:
        from fdp.backends.vmap import VmapBackend  # the backends import this module's users

        one = dataclasses.replace(plan, layout=Layout((plan.layout.total,), plan.layout.dim),
                                  unused="none")
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            _, grads = VmapBackend(1, self.device).value_and_grad(one, params, batch)
        return frozenset(k for k, g in grads.items() if g is None)


def _key_scope(key: torch.Tensor, row_offset: int) -> AbstractContextManager[None]:
    return key_context(key, row_offset=row_offset)


def _params_ok(params: Any, device: torch.device) -> bool:
    return isinstance(params, dict) and bool(params) and all(
        isinstance(v, torch.Tensor) and v.is_floating_point() and v.device == device
        for v in params.values())


def _check_params(params: Any, mesh: Mesh) -> None:
    _check.param_dict(params, "value_and_grad")
    if not params:
        raise ValueError("value_and_grad: params is empty; there is nothing to differentiate")
    _inputs.on_device([(f"params[{k!r}]", v) for k, v in params.items()], mesh,
                     "value_and_grad")
    for key, value in params.items():
        if not value.is_floating_point():
            raise TypeError(f"value_and_grad: params[{key!r}] is {value.dtype}; gradients "
                            f"need floating-point parameters")


def _fast_rows(batch: Any, dim: int, device: torch.device) -> int | None:
    """The batch size of a well-formed batch, or None to run the thorough checks."""
    rows = None
    for leaf in _tree.flatten(batch, is_leaf=lambda x: isinstance(x, Sharded))[0]:
        if isinstance(leaf, torch.Tensor):
            if leaf.device != device or not -leaf.dim() <= dim < leaf.dim():
                return None
            if rows is None:
                rows = leaf.shape[dim]
            elif leaf.shape[dim] != rows:
                return None
        elif isinstance(leaf, Sharded) or hasattr(leaf, "__array__"):
            return None
    return rows or None


def _checked_rows(batch: Any, mesh: Mesh, dim: int) -> int:
    if isinstance(batch, Sharded):
        raise TypeError("value_and_grad: pass the full batch, not fdp.scatter's output; "
                        "choose the split with value_and_grad(..., split=...)")
    rows = batch_size(batch, dim, "value_and_grad")
    _inputs.on_device(_inputs.batch_leaves(batch, "value_and_grad", "batch"), mesh,
                     "value_and_grad")
    return rows


_LAYOUTS: dict[tuple, Layout] = {}  # a plain dict: torch.compile traces it, unlike lru_cache


def _layout(rows: int, n: int, split: str | tuple[int, ...], dim: int) -> Layout:
    if compiling():  # traced once per shape anyway; a cache would add guards
        return Layout(split_sizes(rows, n, split, "value_and_grad"), dim)
    key = (rows, n, split, dim)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 1024:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = Layout(split_sizes(rows, n, split, "value_and_grad"), dim)
    return layout
