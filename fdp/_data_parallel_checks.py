"""Argument checks and defaults of :class:`fdp.DataParallel` (errors name the argument)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdp import _check, _tree
from fdp._layout import split_sizes
from fdp._mesh import Mesh
from fdp.backends._options import check_buffer_policy, check_randomness

_FN = "DataParallel"

Tensors = _tree.Params


def _check_options(module: Any, mesh: Any, dim: Any, split: Any, buffer_policy: Any,
                   randomness: Any) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{_FN}: module must be a torch.nn.Module, got {type(module).__name__}")
    if mesh is not None and not isinstance(mesh, Mesh):
        hint = (" (nn.DataParallel's device_ids=[0, 1] is "
                "mesh=fdp.Mesh(devices=['cuda:0', 'cuda:1']))"
                if isinstance(mesh, (list, tuple)) else "")
        raise TypeError(f"{_FN}: mesh must be an fdp.Mesh or None, got {type(mesh).__name__}"
                        f"{hint}; e.g. mesh=fdp.Mesh(4)")
    if not _check.is_int(dim):
        raise TypeError(f"{_FN}: dim must be an int (the batch dimension), got "
                        f"{type(dim).__name__}")
    if isinstance(split, str):
        split_sizes(1, 1, split, _FN)  # rejects unknown rule names now; sizes per call
    check_buffer_policy(buffer_policy, _FN, optional=False)
    check_randomness(randomness, _FN)


def _module_device(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def _default_mesh(device: torch.device) -> Mesh:
    """What ``nn.DataParallel`` would use: every visible GPU, or just the module."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count > 1:
        return Mesh(devices=[f"cuda:{i}" for i in range(count)])
    return Mesh(1, device=device)


def _check_devices(tensors: Tensors, mesh: Mesh) -> None:
    home = mesh.backend.home
    for name, t in tensors.items():
        if t.device != home:
            raise ValueError(
                f"{_FN}: the module's {name!r} is on {t.device} but the mesh's first replica "
                f"is on {home}; move the module with .to({str(home)!r}) (nn.DataParallel too "
                f"needs the module on device_ids[0]) or build the mesh on {t.device}"
            )


def _batch_size(batch: tuple, dim: int) -> int:
    """The common size at ``dim`` of every tensor in the call; errors name the argument."""
    inputs, kwargs = batch
    pairs = [*_tree.leaves_with_path(inputs, "inputs"), *_tree.leaves_with_path(kwargs, "kwargs")]
    sizes: dict[int, str] = {}
    for path, leaf in pairs:
        if not isinstance(leaf, torch.Tensor):
            if hasattr(leaf, "__array__"):
                raise TypeError(f"{_FN}: {path} is a {type(leaf).__name__}, not a "
                                f"torch.Tensor; convert it with torch.as_tensor to split it")
            continue
        if not -leaf.dim() <= dim < leaf.dim():
            raise ValueError(
                f"{_FN}: {path} has shape {tuple(leaf.shape)}, without a dim={dim} to split; "
                f"every tensor argument is split along dim (as in nn.DataParallel), so pass "
                f"per-call constants as Python numbers or keep them in the module"
            )
        sizes.setdefault(leaf.shape[dim], path)
    if not sizes:
        raise TypeError(f"{_FN}: the call has no tensor argument to split over the replicas; "
                        f"pass the batch as a tensor (or a tuple/list/dict of tensors)")
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise ValueError(f"{_FN}: the tensor arguments disagree on the batch size at dim={dim}: "
                         f"{pa} has {a} rows but {pb} has {b}; every tensor argument is split "
                         f"along dim, so they need the same size there")
    size = next(iter(sizes))
    if size == 0:
        raise ValueError(f"{_FN}: the batch is empty (0 rows at dim={dim}); give at least one row")
    return size
