"""``pmap``'s outputs: agreed across replicas, placed along ``out_axes``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["agreed_outputs", "place", "replicated_number"]


def replicated_number(x: Any, replicas: int, device: torch.device) -> Any:
    """A Python number that every replica returned comes back as a tensor with one entry per
    replica, as ``jax.pmap`` returns it (strings, None and other static values stay as
    they are)."""
    if isinstance(x, (bool, int, float, complex)):
        return torch.full((replicas,), x, device=device)
    return x


def agreed_outputs(calls: list[tuple]) -> tuple[Any, list]:
    """The output structure and static leaves, which every replica must agree on."""
    _, out_def, static = calls[0]
    for index, other_def, other_static in calls[1:]:
        if other_def != out_def or other_static != static:
            raise ValueError(
                f"pmap: replica {int(index)} returned a different structure or different "
                f"non-tensor values than replica {int(calls[0][0])}; every replica must return "
                f"the same structure, and values that differ must be tensors"
            )
    return out_def, static


def _same_on_every_replica(x: torch.Tensor) -> bool:
    first = x[:1].expand_as(x)
    same = x == first
    if x.is_floating_point() or x.is_complex():
        same = same | (torch.isnan(x) & torch.isnan(first))
    return bool(same.all())


def place(x: Any, axis: int | None, path: str) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if axis is None:
        if x.shape[0] > 1 and x.stride(0) != 0 and not _same_on_every_replica(x):
            raise ValueError(
                f"pmap: out_axes=None for {path}, but its value differs across replicas; "
                f"use out_axes=0, or reduce it inside the function (e.g. fdp.pmean)"
            )
        return x[0]
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"pmap: out_axes={axis} is out of range for {path}, which has "
                         f"{x.dim() - 1} dims per replica")
    return x.movedim(0, axis % x.dim())
