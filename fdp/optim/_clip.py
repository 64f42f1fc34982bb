"""Gradient clipping by global norm, as ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import torch

from fdp._compat import pytree
from fdp._donation import check_not_donated
from fdp.optim import _base
from fdp.optim._base import EmptyState, GradientTransformation, PyTree
from fdp.optim._into import NO_INTO, Into
from fdp.optim._native import native

__all__ = ["clip_by_global_norm", "global_norm"]


def global_norm(tree: PyTree) -> torch.Tensor:
    """The 2-norm of all leaves together (the norm of the leaf norms, in leaf order; ``None``
    leaves, no gradient, are left out). Inside an update on sharded optimizer state the leaves
    are slices, and the norm is that of all slices together (see
    :func:`fdp.optim.sum_over_shards`).

    Example:
        >>> fdp.optim.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    leaves = [g for g in _base.grad_leaves(tree, "global_norm") if g is not None]
    if not leaves:
        return torch.tensor(0.0)
    device = leaves[0].device
    norms = [torch.linalg.vector_norm(g, 2).to(device) for g in leaves]
    if _base.sharded():  # a slice of every leaf: the squares summed over all slices
        return _base.sum_over_shards(torch.stack(norms).square().sum()).sqrt()
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales the grads by ``max_norm / (total_norm + 1e-6)`` when that is below 1.

    The same rule and arithmetic as ``torch.nn.utils.clip_grad_norm_`` (no data-dependent
    branch: the factor is clamped to 1). Stateless; ``params`` are not needed.

    Example:
        >>> clip = fdp.optim.clip_by_global_norm(1.0)
        >>> updates, _ = clip.update({"w": torch.tensor([3.0, 4.0])}, clip.init(None))
        >>> updates["w"]
        tensor([0.6000, 0.8000])
    """
    limit = _base.nonnegative(max_norm, "clip_by_global_norm", "max_norm")

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(
        grads: PyTree, state: EmptyState, params: PyTree | None = None, *,
        _into: Into | None = None,
    ) -> tuple[PyTree, EmptyState]:
        if not isinstance(state, EmptyState):
            raise TypeError(f"clip_by_global_norm.update: state must be the EmptyState from its "
                            f"init, got {type(state).__name__}")
        check_not_donated(grads, "clip_by_global_norm.update", "grads")
        leaves, spec = pytree.tree_flatten(grads)
        if all(g is None for g in leaves):
            return grads, state
        into = NO_INTO if _into is None else _into
        coef = torch.clamp(limit / (global_norm(grads) + 1e-6), max=1.0)
        return pytree.tree_unflatten([
            None if g is None else torch.mul(g, coef.to(g.device), out=into.output(i, g))
            for i, g in enumerate(leaves)], spec), state

    return GradientTransformation(init, native(update))
