"""``GradPlan``: everything a backend receives to compute one data-parallel loss and gradient.

:func:`fdp.value_and_grad` checks its arguments, splits the batch (a :class:`fdp.Layout`) and
hands the backend a plan; the backend runs ``plan.call_loss`` (or ``call_forward`` and
``call_criterion`` for the ``"gather"`` strategy) once per replica and reduces the gradients.
The ``call_*`` methods check what the user's functions return, so every backend gives the same
errors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fdp import _tree
from fdp._layout import Layout
from fdp.backends._options import BufferPolicy, Randomness, Reduction, Strategy, Unused

__all__ = ["GradPlan", "KeyScope", "Params", "PyTree", "SplitLoss"]

from fdp._tree import Params, PyTree

KeyScope = Callable[[torch.Tensor, int], AbstractContextManager[None]]
"""``key_scope(key, row_offset)``: the context a replica's forward runs in to draw keyed
randomness (:func:`fdp.random.key_context`)."""


class SplitLoss(NamedTuple):
    """A loss written as a per-example ``forward`` and a ``criterion`` on the whole batch.

    Calling it is the single-device loss ``criterion(forward(params, batch), batch)``; the
    ``"gather"`` strategy of :func:`fdp.value_and_grad` runs ``forward`` per replica and
    ``criterion`` once on the gathered outputs.
    """

    forward: Callable[..., Any]
    criterion: Callable[..., Any]

    def __call__(self, params: Any, batch: Any, *args: Any) -> Any:
        return self.criterion(self.forward(params, batch, *args), batch, *args)


@dataclass(frozen=True)
class GradPlan:
    """One data-parallel loss and gradient, as a backend receives it (arguments checked).

    Attributes:
        loss: the user's single-device loss; a :class:`SplitLoss` with ``strategy="gather"``.
        strategy: how the replicas' results combine into the single-device loss.
        has_aux: ``loss`` returns ``(loss, aux)``.
        reduction: how ``loss`` reduces over examples (the ``"weighted"`` strategy's weights).
        layout: the rows of the batch per replica.
        out_dim: the batch dimension of the forward's outputs (``"gather"``).
        args: extra arguments every replica gets as they are (not split, no gradient).
        randomness: torch's own random ops inside the replicas.
        buffers: with a buffer policy: the buffers the step starts from.
        buffer_policy: which replicas' updated buffers are kept (``None``: no buffers).
        axis_name: the mesh axis the loss's collectives address.
        key: the :mod:`fdp.random` key the replicas' keyed layers draw from.
        row_offset: the first row of this batch in a larger one (microbatches).
        key_scope: binds ``key`` around a replica's forward (given with ``key``).
        unused: the gradient of a parameter no replica's loss depends on: zeros, or ``None``
            (where the backend can tell: tape autograd; under ``torch.func`` transforms and
            ``torch.compile`` it is zeros; :func:`fdp.value_and_grad` then sets ``None``).
    """

    loss: Callable[..., Any]
    strategy: Strategy
    has_aux: bool
    reduction: Reduction
    layout: Layout
    out_dim: int
    args: tuple[Any, ...] = ()
    randomness: Randomness = "error"
    buffers: Params | None = None
    buffer_policy: BufferPolicy | None = None
    axis_name: str = "dp"
    key: torch.Tensor | None = None
    row_offset: int = 0
    key_scope: KeyScope | None = None
    unused: Unused = "zeros"

    def __post_init__(self) -> None:
        if self.key is not None and self.key_scope is None:
            raise ValueError("GradPlan: a key needs its key_scope (fdp.random.key_context)")

    def keyed(self, device: torch.device | None = None) -> AbstractContextManager[None]:
        """The key context a replica's forward runs in (none without a key), with the key
        on the replica's ``device``."""
        if self.key is None or self.key_scope is None:  # both or neither (__post_init__)
            return nullcontext()
        key = self.key if device is None else self.key.to(device)
        return self.key_scope(key, self.row_offset)

    def call_loss(self, params: Params, shard: PyTree, buffers: Params | None = None,
                  args: tuple[Any, ...] | None = None, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, PyTree, Params | None]:
        """``(loss, aux, new_buffers)`` of one replica (``aux``/``new_buffers`` may be None).

        ``args`` replaces :attr:`args` (e.g. moved to the replica's device).
        """
        args = self.args if args is None else args
        with self.keyed(device):
            if self.buffer_policy is None:
                out, new_buffers = self.loss(params, shard, *args), None
            else:
                assert buffers is not None, "a buffer policy needs the buffers"
                out, new_buffers = _split_buffers(self.loss(params, buffers, shard, *args),
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

    def call_forward(self, params: Params, shard: PyTree,
                     device: torch.device | None = None) -> PyTree:
        """The per-example outputs of one replica (``"gather"`` strategy)."""
        assert isinstance(self.loss, SplitLoss), "strategy='gather' needs a SplitLoss"
        with self.keyed(device):
            return self.loss.forward(params, shard, *self.args)

    def call_criterion(self, outputs: PyTree, batch: PyTree) -> Any:
        """The loss of the gathered outputs (``"gather"`` strategy)."""
        assert isinstance(self.loss, SplitLoss), "strategy='gather' needs a SplitLoss"
        return _checked_loss(self.loss.criterion(outputs, batch, *self.args), self.has_aux,
                             "criterion")


def _split_buffers(result: Any, buffers: Params) -> tuple[Any, Params]:
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
