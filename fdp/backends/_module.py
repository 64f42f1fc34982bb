"""``ModuleCall``: one forward of :class:`fdp.DataParallel`, as a backend receives it, and the
per-replica module run that every way of executing it shares.

``DataParallel`` composes its forward from ``replicate``, ``scatter``, ``pmap`` and ``gather``;
a backend whose autograd that composition cannot express (the distributed backend: parameter
gradients summed over processes) runs the :class:`ModuleCall` itself in
:meth:`fdp.backends.Backend.run_module`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fdp import _tree
from fdp._layout import Layout
from fdp.backends._comm import Communicator
from fdp.backends._frame import lookup
from fdp.backends._options import BufferPolicy, Randomness

__all__ = ["Apply", "Dims", "ModuleCall", "ModuleResult", "batch_dim", "batch_dims", "narrow",
           "replica_forward", "StaticDims"]

FN = "DataParallel"
Tensors = _tree.Params
Apply = Callable[..., tuple[Any, Tensors]]
"""``apply(params, buffers, *inputs, **kwargs) -> (output, new_buffers)``
(:attr:`fdp.Model.apply`)."""


@dataclass(frozen=True)
class ModuleCall:
    """One data-parallel forward of a module.

    Attributes:
        apply: the module as a pure function.
        params: the module's own parameters (tracked: ``.backward()`` fills their ``.grad``).
        buffers: the module's buffers (detached).
        inputs, kwargs: the forward's arguments; every tensor in them is split along ``dim``.
        layout: the rows per replica.
        dim: the batch dimension of every tensor argument and output.
        synced: the module has :class:`fdp.nn.SyncBatchNorm` layers (they leave padding rows
            out themselves, so every replica runs on the padded shard).
        buffer_policy: which replicas' updated buffers are kept.
        randomness: torch's own random ops in the replicas.
        axis_name: the mesh axis the module's collectives address.
    """

    apply: Apply
    params: Tensors
    buffers: Tensors
    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    layout: Layout
    dim: int
    synced: bool
    buffer_policy: BufferPolicy
    randomness: Randomness
    axis_name: str


class ModuleResult(NamedTuple):
    """What a forward returns: the gathered output, and the buffers the policy keeps."""

    output: Any
    buffers: Tensors


Dims = tuple[int | None, ...]


@dataclass(frozen=True)
class StaticDims:
    """Output batch dims as one static value: ``fdp.pmap`` returns it as it is (a bare Python
    int would come back as a tensor with one entry per replica, as in ``jax.pmap``)."""

    dims: Dims


def replica_forward(apply: Apply, dim: int, rows: int, axis_name: str
                    ) -> Callable[..., tuple[Any, Tensors, StaticDims]]:
    """``run(params, buffers, count, (inputs, kwargs)) -> (out, new_buffers, dims)``: ``apply``
    on a replica's shard of ``rows`` (padded) rows; with ``count`` (ragged backends), on its
    ``count`` real rows only, the output padded back to ``rows`` so that the replicas' outputs
    stack. ``dims`` is each output leaf's batch dim (``None`` for non-tensors), the same on
    every replica. ``params`` are shared by the replicas and moved to the shard's device
    (differentiably: ``.backward()`` reaches the module's own parameters, sparse gradients
    included)."""

    def run(params: Tensors, buffers: Tensors, count: torch.Tensor | None,
            batch: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[Any, Tensors, StaticDims]:
        n = rows if count is None else int(count)
        trim = 0 < n < rows  # a replica without rows runs on its padding; gather drops it
        inputs, kwargs = narrow(batch, dim, 0, n) if trim else batch
        device = _device_of((inputs, kwargs, buffers))
        params = {k: _replica_param(v, device) for k, v in params.items()}
        out, new_buffers = apply(params, buffers, *inputs, **kwargs)
        comm = None if count is None else lookup(axis_name, FN).comm
        dims = _agreed_dims(out, n if trim else rows, dim, comm)
        return (_pad_rows(out, dims, n, rows) if trim else out), new_buffers, StaticDims(dims)

    return run


def _agreed_dims(out: Any, rows: int, dim: int, comm: Communicator | None) -> Dims:
    """Each output leaf's batch dim. Replicas of different row counts (``comm``) compare their
    output shapes, so that a dim that has the shard's size on one replica by coincidence (an
    RNN's layers) does not pass for the batch dim: it must have each replica's row count."""
    pairs = _tree.leaves_with_path(out, "out")
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for _, x in pairs]
    if comm is None:
        return tuple(None if shape is None else batch_dim(path, shape, rows, dim)
                     for (path, _), shape in zip(pairs, shapes, strict=True))
    mine = torch.tensor([rows, *(s for shape in shapes if shape for s in shape)])
    everyone = comm.all_gather(mine).tolist()
    dims: list[int | None] = []
    at = 1
    for (path, _), shape in zip(pairs, shapes, strict=True):
        if shape is None:
            dims.append(None)
            continue
        common = set(batch_dims(path, shape, rows, dim))
        for theirs in everyone:
            common &= {d for d, size in enumerate(theirs[at:at + len(shape)])
                       if size == theirs[0]}
        at += len(shape)
        order = batch_dims(path, shape, rows, dim)  # dim first
        agreed = [d for d in order if d in common]
        if not agreed:
            raise ValueError(f"{FN}: the module's output {path} has no dim that holds every "
                             f"replica's rows; outputs are gathered along their batch dim")
        dims.append(agreed[0])
    return tuple(dims)


def _replica_param(p: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """The replica's view of a shared parameter: on its device, and never the leaf itself (as
    nn.DataParallel's broadcast copies), so a ``zero_grad()`` inside the forward cannot clear
    the module's gradients. ``alias`` keeps sparse gradients (a ``view`` would not)."""
    if device is not None and p.device != device:
        return p.to(device)
    return torch.ops.aten.alias(p) if p.requires_grad else p


def _device_of(tree: Any) -> torch.device | None:
    return next((x.device for x in _tree.flatten(tree)[0] if isinstance(x, torch.Tensor)), None)


def batch_dims(path: str, shape: tuple[int, ...], rows: int, dim: int) -> list[int]:
    """The dims of an output's ``shape`` that could hold a shard's ``rows`` (``dim`` first,
    where it is one of them)."""
    if not shape:
        raise ValueError(
            f"{FN}: the module returned a scalar at {path}; outputs are gathered along "
            f"dim={dim}, so return per-example values and reduce them (e.g. the loss) on the "
            f"gathered output. Averaging per-replica losses, as with nn.DataParallel, is "
            f"biased when the replicas get different numbers of rows"
        )
    found = [d for d, size in enumerate(shape) if size == rows]
    first = dim % len(shape) if -len(shape) <= dim < len(shape) else None
    return sorted(found, key=lambda d: d != first)


def batch_dim(path: str, shape: tuple[int, ...], rows: int, dim: int) -> int:
    """Where an output of a replica's forward holds the shard's ``rows``: at ``dim`` (where
    every input is split), else the one dim of that size (e.g. an RNN's hidden state
    ``[layers, rows, hidden]``), so that each output is gathered along its own batch dim.
    When ``dim`` has the shard's size it is taken, also if another dim has it too."""
    found = batch_dims(path, shape, rows, dim)
    if found and (len(found) == 1 or (-len(shape) <= dim < len(shape)
                  and found[0] == dim % len(shape))):
        return found[0]
    raise ValueError(
        f"{FN}: the module returned shape {shape} at {path} for a shard of {rows} rows; "
        f"outputs are gathered along their batch dim (dim={dim}, or the one dim of the "
        f"shard's size), and this one has {'none' if not found else 'several'}"
    )


def narrow(tree: Any, dim: int, start: int, length: int) -> Any:
    """Every tensor of ``tree`` narrowed to ``length`` rows from ``start`` at ``dim``."""
    return _tree.map_tensors(lambda x: x.narrow(dim, start, length), tree)


def _pad_rows(out: Any, dims: Dims, n: int, rows: int) -> Any:
    """``n`` rows at each leaf's batch dim -> ``rows`` (repeating the last), so replicas
    stack."""
    leaves, treedef = _tree.flatten(out)
    return _tree.unflatten([x if d is None else x.index_select(
        d, torch.arange(rows, device=x.device).clamp(max=n - 1))
        for x, d in zip(leaves, dims, strict=True)], treedef)
