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
from fdp.backends._options import BufferPolicy, Randomness

__all__ = ["Apply", "ModuleCall", "ModuleResult", "check_rows", "narrow", "replica_forward"]

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


def replica_forward(apply: Apply, dim: int, rows: int) -> Callable[..., tuple[Any, Tensors]]:
    """``run(params, buffers, count, (inputs, kwargs))``: ``apply`` on a replica's shard of
    ``rows`` (padded) rows; with ``count`` (ragged backends), on its ``count`` real rows only,
    the output padded back to ``rows`` so that the replicas' outputs stack."""

    def run(params: Tensors, buffers: Tensors, count: torch.Tensor | None,
            batch: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[Any, Tensors]:
        n = rows if count is None else int(count)
        trim = 0 < n < rows  # a replica without rows runs on its padding; gather drops it
        inputs, kwargs = narrow(batch, dim, 0, n) if trim else batch
        out, new_buffers = apply(params, buffers, *inputs, **kwargs)
        return (_pad_rows(out, dim, n, rows) if trim else out), new_buffers

    return run


def narrow(tree: Any, dim: int, start: int, length: int) -> Any:
    """Every tensor of ``tree`` narrowed to ``length`` rows from ``start`` at ``dim``."""
    return _tree.map_tensors(lambda x: x.narrow(dim, start, length), tree)


def _pad_rows(out: Any, dim: int, n: int, rows: int) -> Any:
    """``n`` rows at ``dim`` -> ``rows`` (repeating the last), so replicas stack."""

    def pad(path: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        check_rows(path, tuple(x.shape), n, dim)
        index = torch.arange(rows, device=x.device).clamp(max=n - 1)
        return x.index_select(dim, index)

    return _tree.map_with_path(pad, out, root="out")


def check_rows(path: str, shape: tuple[int, ...], rows: int, dim: int) -> None:
    """An output of a replica's forward must hold the shard's ``rows`` at ``dim``."""
    if not shape:
        raise ValueError(
            f"{FN}: the module returned a scalar at {path}; outputs are gathered along "
            f"dim={dim}, so return per-example values and reduce them (e.g. the loss) on the "
            f"gathered output. Averaging per-replica losses, as with nn.DataParallel, is "
            f"biased when the replicas get different numbers of rows"
        )
    if not -len(shape) <= dim < len(shape) or shape[dim] != rows:
        raise ValueError(
            f"{FN}: the module returned shape {shape} at {path} for a shard of {rows} rows; "
            f"outputs are gathered along dim={dim}, so they need the shard's rows there"
        )
