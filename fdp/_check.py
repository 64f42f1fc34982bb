"""Eager argument validation shared by the public functions (errors name argument and key path)."""

from __future__ import annotations

from typing import Any

import torch

from fdp import _tree
from fdp._layout import Sharded
from fdp._mesh import Mesh


def mesh(value: Any, fn: str) -> Mesh:
    if not isinstance(value, Mesh):
        raise TypeError(
            f"{fn}: mesh must be an fdp.Mesh, got {type(value).__name__}; e.g. mesh=fdp.Mesh(4)"
        )
    return value


def callable_(value: Any, fn: str, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{fn}: {name} must be callable, got {type(value).__name__}")


def integer(value: Any, fn: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    return value


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


def replica_axis(
    tree: Any, mesh_: Mesh, fn: str, root: str, static_ok: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Checks that every tensor leaf has a leading replica axis of the mesh's size.

    With ``static_ok``, plain Python leaves are allowed (they are the same on every replica).
    """
    pairs = batch_leaves(tree, fn, root) if static_ok else tensor_leaves(tree, fn, root)
    local = mesh_.impl.local_size  # the replicas this process holds
    for path, leaf in pairs:
        if leaf.dim() == 0 or leaf.shape[0] != local:
            shape = tuple(leaf.shape)
            what = "the mesh size" if local == mesh_.size else "this process's replicas"
            raise ValueError(
                f"{fn}: {path} has shape {shape} but needs a leading replica axis of size "
                f"{local} ({what}); build it with fdp.replicate or fdp.pmap"
            )
    return pairs


def on_device(pairs: list[tuple[str, torch.Tensor]], mesh_: Mesh, fn: str) -> None:
    """Checks that tensors live where the mesh's replicas do (vmap backend: one device)."""
    device = mesh_.devices[0]
    for path, leaf in pairs:
        if leaf.device != device and leaf.dim() > 0:
            raise ValueError(
                f"{fn}: {path} is on {leaf.device} but the mesh's replicas live on {device}; "
                f"move it with .to({str(device)!r}) or build the mesh with "
                f"fdp.Mesh({mesh_.size}, device={str(leaf.device)!r})"
            )


def param_dict(params: Any, fn: str, name: str = "params") -> dict[str, torch.Tensor]:
    if not isinstance(params, dict):
        raise TypeError(
            f"{fn}: {name} must be a dict of tensors (name -> Tensor), got "
            f"{type(params).__name__}; fdp.functionalize(module).params is one"
        )
    for key, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{fn}: {name}[{key!r}] is a {type(value).__name__}, not a torch.Tensor"
            )
    return params
