"""``fdp.accumulate``: gradient accumulation over microbatches as a pure transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fdp import _check, _tree
from fdp._inputs import batch_size
from fdp._layout import split_sizes
from fdp.backends._options import Reduction, SplitRule, check_reduction

__all__ = ["accumulate"]

ValueAndGrad = Callable[..., tuple[Any, Any]]


def accumulate(
    value_and_grad_fn: ValueAndGrad,
    microbatches: int,
    *,
    has_aux: bool = False,
    split: SplitRule = "even",
    dim: int = 0,
    reduction: Reduction = "mean",
) -> ValueAndGrad:
    """Runs ``value_and_grad_fn`` on ``microbatches`` slices of the batch, one after another,
    and combines them into the full batch's loss and gradient.

    Microbatch ``m`` with ``Bₘ`` of the ``B`` rows is weighted by ``Bₘ / B`` (``reduction=
    "mean"``) or 1 (``"sum"``), so unequal microbatches give exactly the full-batch result, as
    for replicas. Peak memory is that of one microbatch. It composes with
    :func:`fdp.value_and_grad` (each microbatch is then split over the mesh) and with plain
    ``torch.func.grad_and_value``-style functions that return ``(loss, grads)``.

    Args:
        value_and_grad_fn: ``(params, batch, *args) -> (loss, grads)`` (``((loss, aux), grads)``
            with ``has_aux``), where ``loss`` is a mean (or sum) over the rows it is given;
            ``args`` are passed to every call as they are.
        microbatches: how many slices (≥ 1). Slices with no rows (more slices than rows) are
            skipped.
        has_aux: ``value_and_grad_fn`` returns ``((loss, aux), grads)``; the result's aux is
            the list of the non-empty microbatches' aux values, in order.
        split: how rows are divided among microbatches (see :func:`fdp.scatter`).
        dim: the batch dimension of every tensor in the batch.
        reduction: ``"mean"`` or ``"sum"``, as the loss reduces over rows.

    Example:
        >>> params = {"w": torch.ones(3)}
        >>> loss_fn = lambda p, b: (b @ p["w"]).pow(2).mean()
        >>> vg = fdp.accumulate(fdp.value_and_grad(loss_fn, fdp.Mesh(2)), microbatches=3)
        >>> loss, grads = vg(params, torch.randn(10, 3))
        >>> grads["w"].shape
        torch.Size([3])
    """
    _check.callable_(value_and_grad_fn, "accumulate", "value_and_grad_fn")
    _check.integer(microbatches, "accumulate", "microbatches")
    if microbatches < 1:
        raise ValueError(f"accumulate: microbatches must be ≥ 1, got {microbatches}")
    reduction = check_reduction(reduction, "accumulate")
    if isinstance(split, str):
        split_sizes(1, 1, split, "accumulate")

    def run(params: Any, batch: Any, *args: Any, key: Any = None) -> tuple[Any, Any]:
        rows = batch_size(batch, dim, "accumulate")
        sizes = split_sizes(rows, microbatches, split, "accumulate")
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        loss, grads, auxes = None, None, []
        for start, size in zip(offsets, sizes, strict=True):
            if size == 0:
                continue
            micro = _slice(batch, dim, start, size)
            # one key for every slice: keyed layers count rows from the full batch's first row
            keyed = {} if key is None else {"key": key, "row_offset": start}
            out, g = value_and_grad_fn(params, micro, *args, **keyed)
            if has_aux and not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("accumulate: with has_aux=True, value_and_grad_fn must return "
                                f"((loss, aux), grads), got ({type(out).__name__}, grads)")
            part_loss, aux = out if has_aux else (out, None)
            weight = size / rows if reduction == "mean" else 1.0
            loss = part_loss * weight if loss is None else loss + part_loss * weight
            grads = _scaled(g, weight) if grads is None else _add_scaled(grads, g, weight)
            auxes.append(aux)
        if has_aux:
            return (loss, auxes), grads
        return loss, grads

    return run


def _slice(batch: Any, dim: int, start: int, size: int) -> Any:
    leaves, treedef = _tree.flatten(batch)
    return _tree.unflatten([x.narrow(dim, start, size) if isinstance(x, torch.Tensor) else x
                            for x in leaves], treedef)


def _scaled(tree: Any, weight: float) -> Any:
    if weight == 1.0:
        return tree
    return _tree.map_with_path(lambda _, g: None if g is None else g * weight, tree)


def _add_scaled(acc: Any, tree: Any, weight: float) -> Any:
    """``acc + weight * tree``; ``None`` (no gradient) is the sum's identity."""

    def add(_: str, a: Any, g: Any) -> Any:
        if g is None:
            return a
        return g * weight if a is None else a + g * weight

    return _tree.map_with_path(add, acc, tree)
