"""Checks of the trees that public functions receive: batches, replicated values, and where
their tensors live (errors name the argument and the key path)."""

from __future__ import annotations

from typing import Any

import torch

from fdp import _check, _tree
from fdp._layout import Sharded
from fdp._mesh import Mesh

__all__ = ["batch_leaves", "batch_size", "on_device", "replica_axis", "tensor_leaves"]


def _not_sharded(leaf: Any, path: str, fn: str) -> None:
    if isinstance(leaf, Sharded):
        raise TypeError(
            f"{fn}: {path} is an fdp.Sharded (rows split over replicas); use fdp.gather(...) "
            f"to get the batch back, or its .data for the padded per-replica tensors"
        )


def tensor_leaves(tree: Any, fn: str, root: str) -> list[tuple[str, torch.Tensor]]:
    """Returns the tensor leaves of ``tree``; any other leaf (except None) is a TypeError."""
    pairs = []
    for path, leaf in _tree.leaves_with_path(tree, root):
        _not_sharded(leaf, path, fn)
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor):
            hint = (
                "; convert it with torch.as_tensor" if hasattr(leaf, "__array__") else ""
            )
            raise TypeError(f"{fn}: {path} is a {type(leaf).__name__}, not a torch.Tensor{hint}")
        pairs.append((path, leaf))
    return pairs


def batch_leaves(tree: Any, fn: str, root: str) -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of a batch; plain Python values are broadcast, array-likes are an error."""
    pairs = []
    for path, leaf in _tree.leaves_with_path(tree, root):
        _not_sharded(leaf, path, fn)
        if isinstance(leaf, torch.Tensor):
            pairs.append((path, leaf))
        elif hasattr(leaf, "__array__"):
            raise TypeError(
                f"{fn}: {path} is a {type(leaf).__name__}, not a torch.Tensor; convert it with "
                f"torch.as_tensor (plain Python values are broadcast to every replica)"
            )
    return pairs


def batch_size(tree: Any, dim: int, fn: str, root: str = "batch") -> int:
    """The common size of every tensor leaf at ``dim``; errors name the offending key path."""
    _check.integer(dim, fn, "dim")
    pairs = batch_leaves(tree, fn, root)
    if not pairs:
        raise ValueError(f"{fn}: {root} has no tensor leaves to split")
    first: tuple[Any, str] | None = None  # not a dict of sizes: a traced size is no key
    for path, leaf in pairs:
        if not -leaf.dim() <= dim < leaf.dim():
            raise ValueError(
                f"{fn}: dim={dim} is out of range for {path} with shape {tuple(leaf.shape)}; "
                f"every tensor in the batch needs the batch dimension"
            )
        if first is None:
            first = (leaf.shape[dim], path)
        elif leaf.shape[dim] != first[0]:
            raise ValueError(
                f"{fn}: batch leaves disagree on the batch size at dim={dim}: {first[1]} has "
                f"{first[0]} rows, {path} has {leaf.shape[dim]}; pass per-batch constants "
                f"outside the batch"
            )
    assert first is not None
    size = first[0]
    if size == 0:
        raise ValueError(f"{fn}: {root} is empty (0 rows at dim={dim}); give at least one row")
    return size


def replica_axis(
    tree: Any, mesh: Mesh, fn: str, root: str, static_ok: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Checks that every tensor leaf has a leading replica axis of the mesh's size.

    With ``static_ok``, plain Python leaves are allowed (they are the same on every replica).
    """
    pairs = batch_leaves(tree, fn, root) if static_ok else tensor_leaves(tree, fn, root)
    local = mesh.backend.local_size  # the replicas this process holds
    for path, leaf in pairs:
        if leaf.dim() == 0 or leaf.shape[0] != local:
            shape = tuple(leaf.shape)
            what = "the mesh size" if local == mesh.size else "this process's replicas"
            raise ValueError(
                f"{fn}: {path} has shape {shape} but needs a leading replica axis of size "
                f"{local} ({what}); build it with fdp.replicate or fdp.pmap"
            )
    return pairs


def on_device(pairs: list[tuple[str, torch.Tensor]], mesh: Mesh, fn: str) -> None:
    """Checks that tensors live where the mesh keeps replicated values."""
    device = mesh.backend.home
    for path, leaf in pairs:
        if leaf.device != device and leaf.dim() > 0:
            raise ValueError(
                f"{fn}: {path} is on {leaf.device} but the mesh's replicas live on {device}; "
                f"move it with .to({str(device)!r}) or build the mesh with "
                f"fdp.Mesh({mesh.size}, device={str(leaf.device)!r})"
            )
