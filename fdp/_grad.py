"""``fdp.value_and_grad``: the single-device loss and gradient, computed data-parallel."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fdp import _check, _tree
from fdp._buffers import check_policy
from fdp._layout import Layout, Sharded, SplitRule, split_sizes
from fdp._mesh import Mesh
from fdp._pmap import check_randomness
from fdp._primitives import batch_size

__all__ = ["SplitLoss", "split_loss", "value_and_grad"]

_STRATEGIES = ("weighted", "gather")
_REDUCTIONS = ("mean", "sum")


class SplitLoss(NamedTuple):
    """A loss written as a per-example ``forward`` and a ``criterion`` on the whole batch.

    Calling it is the single-device loss ``criterion(forward(params, batch), batch)``; the
    ``"gather"`` strategy of :func:`value_and_grad` runs ``forward`` per replica and
    ``criterion`` once on the gathered outputs.
    """

    forward: Callable[..., Any]
    criterion: Callable[..., Any]

    def __call__(self, params: Any, batch: Any, *args: Any) -> Any:
        return self.criterion(self.forward(params, batch, *args), batch, *args)


def split_loss(
    forward: Callable[..., Any], criterion: Callable[..., Any]
) -> SplitLoss:
    """Builds a :class:`SplitLoss` (needed by ``value_and_grad(..., strategy="gather")``)."""
    _check.callable_(forward, "split_loss", "forward")
    _check.callable_(criterion, "split_loss", "criterion")
    return SplitLoss(forward, criterion)


@dataclass(frozen=True)
class GradPlan:
    """Everything a backend needs to compute one data-parallel loss and gradient."""

    loss: Callable[..., Any]
    strategy: str
    has_aux: bool
    reduction: str
    layout: Layout
    out_dim: int
    args: tuple = ()  # extra arguments every replica gets as they are (not split, no gradient)
    randomness: str = "error"
    buffers: dict[str, torch.Tensor] | None = None  # with a buffer policy: the step's input
    buffer_policy: str | None = None
    axis_name: str = "dp"
    key: torch.Tensor | None = None  # fdp.random key the replicas' random layers draw from
    row_offset: int = 0  # first row of this batch in a larger one (accumulate's slices)

    def keyed(self) -> Any:
        """The key context every replica's forward runs in (none without a key)."""
        if self.key is None:
            return contextlib.nullcontext()
        from fdp.random import key_context

        return key_context(self.key, row_offset=self.row_offset)

    def call_loss(self, params: Any, shard: Any, buffers: Any = None) -> tuple[Any, Any, Any]:
        """``(loss, aux, new_buffers)`` of one replica (``aux``/``new_buffers`` may be None)."""
        with self.keyed():
            if self.buffer_policy is None:
                out, new_buffers = self.loss(params, shard, *self.args), None
            else:
                out, new_buffers = _split_buffers(self.loss(params, buffers, shard, *self.args),
                                                  buffers)
        out = _checked_loss(out, self.has_aux, "loss_fn")
        if not self.has_aux:
            return out, None, new_buffers
        for path, leaf in _tree.leaves_with_path(out[1], "aux"):
            if not isinstance(leaf, torch.Tensor):  # aux comes back stacked over replicas
                raise TypeError(
                    f"value_and_grad: {path} is a {type(leaf).__name__}; with "
                    f"strategy='weighted', aux is stacked over replicas and must hold "
                    f"tensors (wrap it with torch.tensor)"
                )
        return out[0], out[1], new_buffers

    def call_forward(self, params: Any, shard: Any) -> Any:
        with self.keyed():
            return self.loss.forward(params, shard, *self.args)

    def call_criterion(self, outputs: Any, batch: Any) -> Any:
        return _checked_loss(self.loss.criterion(outputs, batch, *self.args), self.has_aux,
                             "criterion")


def _split_buffers(result: Any, buffers: dict[str, torch.Tensor]) -> tuple[Any, dict]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError(
            f"value_and_grad: with a buffer_policy, loss_fn(params, buffers, batch) must "
            f"return (loss, new_buffers) (((loss, aux), new_buffers) with has_aux), got "
            f"{type(result).__name__}; model.apply returns the new buffers"
        )
    out, new_buffers = result
    if new_buffers.keys() != buffers.keys():
        raise ValueError(
            f"value_and_grad: loss_fn returned buffers with keys {sorted(new_buffers)} but got "
            f"{sorted(buffers)}; return every buffer (model.apply's second output)"
        )
    for key, value in new_buffers.items():
        old = buffers[key]
        if not isinstance(value, torch.Tensor) or value.shape != old.shape \
                or value.dtype != old.dtype:
            got = (f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor)
                   else type(value).__name__)
            raise ValueError(f"value_and_grad: new_buffers[{key!r}] is {got}, but the buffer "
                             f"is {old.dtype}{list(old.shape)}")
    return out, new_buffers


def _checked_loss(out: Any, has_aux: bool, name: str) -> Any:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"value_and_grad: with has_aux=True, {name} must return "
                            f"(loss, aux), got {type(out).__name__}")
        loss = out[0]
    else:
        loss = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"value_and_grad: {name} must return a scalar loss per replica, got "
                         f"{shape}; reduce it (e.g. .mean()), or return (loss, aux) with "
                         f"has_aux=True")
    if not loss.is_floating_point():
        raise TypeError(f"value_and_grad: {name} returned a {loss.dtype} loss; it must be "
                        f"floating point")
    return out


def value_and_grad(
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    has_aux: bool = False,
    *,
    strategy: str = "weighted",
    split: SplitRule = "chunk",
    dim: int = 0,
    reduction: str = "mean",
    randomness: str = "error",
    buffer_policy: str | None = None,
) -> Callable[..., tuple[Any, dict[str, torch.Tensor]]]:
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
            stats): ``"replica0"``, ``"mean"`` or ``"sync"`` (see ``fdp._buffers`` and
            docs/training.md). Then ``loss_fn(params, buffers, batch)`` returns
            ``(loss, new_buffers)`` (``((loss, aux), new_buffers)`` with ``has_aux``), the
            returned function takes ``(params, buffers, batch, *args)`` and gives
            ``((loss, new_buffers), grads)``. Collectives inside ``loss_fn`` (e.g.
            :class:`fdp.nn.SyncBatchNorm`) see ``mesh.axis_name``.

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
    _check.mesh(mesh, "value_and_grad")
    if strategy not in _STRATEGIES:
        raise ValueError(f"value_and_grad: unknown strategy={strategy!r}; use one of "
                         f"{_STRATEGIES}")
    if strategy == "gather" and not isinstance(loss_fn, SplitLoss):
        raise TypeError("value_and_grad: strategy='gather' needs the loss split into a "
                        "per-example forward and a criterion: "
                        "loss_fn=fdp.split_loss(forward, criterion)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"value_and_grad: unknown reduction={reduction!r}; use one of "
                         f"{_REDUCTIONS}")
    _check.integer(dim, "value_and_grad", "dim")
    check_randomness(randomness, "value_and_grad")
    if isinstance(split, str):
        split_sizes(1, 1, split, "value_and_grad")  # validates the rule's name eagerly
    check_policy(buffer_policy, "value_and_grad")
    if buffer_policy is not None and strategy == "gather":
        raise ValueError("value_and_grad: buffer_policy works with strategy='weighted' (each "
                         "replica's loss_fn returns its new buffers)")

    split_key = split if isinstance(split, str) else tuple(split)
    device = mesh.devices[0]

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
            from fdp.random import _key_words

            _key_words(key, "value_and_grad")
        _check.integer(row_offset, "value_and_grad", "row_offset")
        return GradPlan(loss_fn, strategy, has_aux, reduction, layout, dim, args, randomness,
                        buffers, buffer_policy, mesh.axis_name, key, row_offset)

    if buffer_policy is None:
        def run(params: dict[str, torch.Tensor], batch: Any, *args: Any,
                key: torch.Tensor | None = None, row_offset: int = 0) -> tuple[Any, dict]:
            plan = plan_for(params, batch, args, None, key, row_offset)
            return _call_backend(mesh, plan, params, batch)

        return run

    def run_with_buffers(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                         batch: Any, *args: Any, key: torch.Tensor | None = None,
                         row_offset: int = 0) -> tuple[Any, dict]:
        _check.param_dict(buffers, "value_and_grad", "buffers")
        plan = plan_for(params, batch, args, buffers, key, row_offset)
        return _call_backend(mesh, plan, params, batch)

    return run_with_buffers


def _call_backend(mesh: Mesh, plan: GradPlan, params: dict, batch: Any) -> tuple[Any, dict]:
    try:
        return mesh.impl.value_and_grad(plan, params, batch)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise ValueError(
            f"value_and_grad: a BatchNorm layer in training got 1 row per channel on a replica "
            f"(the batch of {plan.layout.total} splits into {plan.layout.sizes}); per-replica "
            f"batch statistics need at least 2 rows. Use buffer_policy='sync' with "
            f"fdp.nn.convert_sync_batchnorm(module) (statistics over the whole batch), a larger "
            f"batch, or eval mode"
        ) from e


def _params_ok(params: Any, device: torch.device) -> bool:
    return isinstance(params, dict) and bool(params) and all(
        isinstance(v, torch.Tensor) and v.is_floating_point() and v.device == device
        for v in params.values())


def _check_params(params: Any, mesh: Mesh) -> None:
    _check.param_dict(params, "value_and_grad")
    if not params:
        raise ValueError("value_and_grad: params is empty; there is nothing to differentiate")
    _check.on_device([(f"params[{k!r}]", v) for k, v in params.items()], mesh,
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
    _check.on_device(_check.batch_leaves(batch, "value_and_grad", "batch"), mesh,
                     "value_and_grad")
    return rows


_LAYOUTS: dict[tuple, Layout] = {}  # a plain dict: torch.compile traces it, unlike lru_cache


def _layout(rows: int, n: int, split: str | tuple[int, ...], dim: int) -> Layout:
    if torch.compiler.is_compiling():  # traced once per shape anyway; a cache would add guards
        return Layout(split_sizes(rows, n, split, "value_and_grad"), dim)
    key = (rows, n, split, dim)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 1024:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = Layout(split_sizes(rows, n, split, "value_and_grad"), dim)
    return layout
