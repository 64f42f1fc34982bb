"""Pure data-parallel primitives on the leading-replica-axis view: replicate, scatter, gather,
all_reduce, unreplicate. None of them writes to its inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fdp import _check, _inputs, _tree
from fdp._inputs import batch_size
from fdp._layout import Layout, Sharded, split_sizes
from fdp._mesh import Mesh, check_mesh
from fdp.backends._options import ReduceOp, SplitRule, check_reduce_op

__all__ = ["all_reduce", "gather", "replicate", "scatter", "unreplicate"]

def replicate(tree: Any, mesh: Mesh) -> Any:
    """Gives every tensor leaf a leading replica axis: one copy per replica.

    On the vmap backend this is an ``expand`` (no copy). ``None`` leaves stay ``None``.

    Example:
        >>> fdp.replicate({"w": torch.ones(2)}, fdp.Mesh(3))["w"].shape
        torch.Size([3, 2])
    """
    check_mesh(mesh, "replicate")
    _inputs.tensor_leaves(tree, "replicate", "tree")
    return _tree.map_tensors(mesh.backend.replicate, tree)


def unreplicate(tree: Any, mesh: Mesh) -> Any:
    """Takes replica 0's value of every leaf (inverse of :func:`replicate`)."""
    check_mesh(mesh, "unreplicate")
    _inputs.replica_axis(tree, mesh, "unreplicate", "tree", static_ok=True)
    return _tree.map_tensors(mesh.backend.unreplicate, tree)


def scatter(batch: Any, mesh: Mesh, dim: int = 0, split: SplitRule = "chunk") -> Sharded:
    """Splits a batch over the replicas.

    Args:
        batch: a tree of tensors that all share the batch size at ``dim``; non-tensor leaves are
            broadcast to every replica.
        mesh: the mesh.
        dim: the batch dimension of every tensor leaf.
        split: ``"chunk"`` (``torch.chunk``'s rule, as ``nn.DataParallel``: ceil-sized pieces,
            trailing replicas may get nothing), ``"even"`` (sizes differ by at most one), or an
            explicit list of row counts, one per replica.

    Returns:
        A :class:`Sharded` whose ``data`` has a leading replica axis, padded to the largest
        shard when sizes differ (``mask``/``counts`` say which rows are real). Even splits are
        views of ``batch``.

    Example:
        >>> s = fdp.scatter(torch.arange(5.0), fdp.Mesh(2))
        >>> s.layout.sizes, s.data.shape
        ((3, 2), torch.Size([2, 3]))
    """
    check_mesh(mesh, "scatter")
    rows = batch_size(batch, dim, "scatter")
    layout = Layout(split_sizes(rows, mesh.size, split, "scatter"), dim)
    data = _tree.map_tensors(lambda x: mesh.backend.shard(x, layout), batch)
    return Sharded(data, layout)


def gather(outs: Any, mesh: Mesh, dim: int | None = None) -> Any:
    """Concatenates per-replica rows back into one batch, in the original order.

    ``outs`` is a :class:`Sharded` (from :func:`scatter`, or :func:`fdp.pmap` over sharded
    inputs): padding rows are dropped. A plain tree with a leading replica axis is treated as an
    even split.

    Args:
        outs: per-replica rows.
        mesh: the mesh.
        dim: the per-replica batch dimension of every leaf. Default: the dimension the batch
            was scattered along (``outs.layout.dim``), or 0 for a plain tree. Give it when
            ``pmap`` produced outputs whose batch axis is elsewhere.

    Example:
        >>> mesh = fdp.Mesh(2)
        >>> fdp.gather(fdp.scatter(torch.arange(5.0), mesh), mesh)
        tensor([0., 1., 2., 3., 4.])
    """
    check_mesh(mesh, "gather")
    if isinstance(outs, Sharded):
        tree, layout = outs.data, outs.layout
        dim = layout.dim if dim is None else dim
        if len(layout.sizes) != mesh.size:
            raise ValueError(
                f"gather: outs was split over {len(layout.sizes)} replicas but the mesh has "
                f"{mesh.size}; gather with the mesh that scattered it"
            )
    else:
        tree, layout = outs, None
        dim = 0 if dim is None else dim
    _check.integer(dim, "gather", "dim")
    pairs = _inputs.replica_axis(tree, mesh, "gather", "outs", static_ok=True)
    for path, leaf in pairs:
        per_replica = leaf.dim() - 1
        if not -per_replica <= dim < per_replica:
            raise ValueError(
                f"gather: dim={dim} is out of range for {path}, whose per-replica shape is "
                f"{tuple(leaf.shape[1:])}; per-replica scalars can be reduced with all_reduce"
            )
        if layout is not None and leaf.shape[1:][dim] != layout.max_size:
            raise ValueError(
                f"gather: {path} has {leaf.shape[1:][dim]} rows per replica at dim={dim}, but "
                f"its layout pads to {layout.max_size}; pass the dim of the batch axis"
            )

    def unshard(x: torch.Tensor) -> torch.Tensor:
        d = dim % (x.dim() - 1)
        lay = layout or Layout((x.shape[d + 1],) * mesh.size, d)
        return mesh.backend.unshard(x, lay, d)

    return _tree.map_tensors(unshard, tree)


def all_reduce(
    tree: Any,
    mesh: Mesh,
    op: ReduceOp = "mean",
    weights: torch.Tensor | Sequence[float] | None = None,
) -> Any:
    """Reduces every leaf over its replica axis; each replica gets the result.

    Args:
        tree: leaves with a leading replica axis.
        mesh: the mesh.
        op: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``.
        weights: for ``op="mean"`` only: one non-negative weight per replica, e.g. the real
            row counts of an uneven split (``sharded.counts``), giving ``Σ wᵢxᵢ / Σ wᵢ``.

    Example:
        >>> mesh = fdp.Mesh(2)
        >>> fdp.all_reduce(torch.tensor([1.0, 3.0]), mesh, "mean", weights=[1, 3])
        tensor([2.5000, 2.5000])
    """
    check_mesh(mesh, "all_reduce")
    op = check_reduce_op(op, "all_reduce")
    w = _weights(weights, op, mesh)
    for path, leaf in _inputs.replica_axis(tree, mesh, "all_reduce", "tree"):
        if (op == "mean") and not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"all_reduce: op='mean' needs floating-point values but {path} is {leaf.dtype}; "
                f"use op='sum' or cast it"
            )
    return _tree.map_tensors(lambda x: mesh.backend.all_reduce(x, op, w), tree)


def _weights(weights: Any, op: ReduceOp, mesh: Mesh) -> torch.Tensor | None:
    if weights is None:
        return None
    if op != "mean":
        raise ValueError(f"all_reduce: weights only apply to op='mean', not op={op!r}")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (mesh.size,):
        raise ValueError(
            f"all_reduce: weights has shape {tuple(w.shape)}; give one weight per replica, "
            f"shape ({mesh.size},)"
        )
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("all_reduce: weights must be finite, non-negative, with a positive sum")
    return w
