"""Buffer policies: how the replicas' updated buffers (e.g. BatchNorm running stats) become one.

Under data parallelism every replica runs the model on its own rows, so stateful layers
produce one new buffer value per replica. A policy says which value the step keeps:

* ``"replica0"``: the first replica that received rows (what ``nn.DataParallel`` keeps: the
  module on device 0 is the original, the other replicas' updates are discarded);
* ``"mean"``: the average over replicas, weighted by their real row counts (floating-point
  buffers; integer ones such as ``num_batches_tracked`` are the same on every replica). For a
  BatchNorm's running mean this equals the single-device update; its running variance misses
  the spread *between* the replicas' batch means (see docs/training.md);
* ``"sync"``: layers that synchronize their statistics over the mesh axis
  (:func:`fdp.nn.convert_sync_batchnorm`) give every replica the same value; fdp checks that
  and keeps it. A layer that did not synchronize makes the replicas disagree: an error names it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fdp._compat import compiling
from fdp.backends._comm import Communicator
from fdp.backends._options import BufferPolicy

__all__ = ["exchange_buffers", "reduce_buffers"]


def reduce_buffers(stacked: dict[str, torch.Tensor], counts: Sequence[int], policy: BufferPolicy,
                   fn: str = "value_and_grad") -> dict[str, torch.Tensor]:
    """One value per buffer from ``stacked`` (leading axis: the replicas that got rows, whose
    row counts are ``counts``)."""
    weights = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    weights = weights / weights.sum()  # normalised: no overflow in a narrow dtype
    out = {}
    for key, value in stacked.items():
        if policy == "replica0" or value.shape[0] == 1:
            out[key] = value[0]
        elif policy == "sync":
            _check_synchronized(key, value, fn)
            out[key] = value[0]
        elif value.is_floating_point() or value.is_complex():
            # accumulated in float64 (complex128), then rounded once to the buffer's dtype
            wide = torch.complex128 if value.is_complex() else torch.float64
            w = weights.to(value.device).reshape(-1, *([1] * (value.dim() - 1)))
            out[key] = (w * value.to(wide)).sum(0).to(value.dtype)
        else:
            out[key] = value[0]
    return out


def _check_synchronized(key: str, value: torch.Tensor, fn: str) -> None:
    """Every replica holds the same ``value`` (leading axis: the replicas), or an error.

    Under torch.compile the check is an in-graph assertion (``torch._assert_async``, with the
    same message) instead of a ``.item()``, which would break the graph every step.
    """
    message = (f"{fn}: buffer_policy='sync' but buffer {key!r} differs across replicas: its "
               f"layer computes per-replica statistics. Convert the model's BatchNorm layers "
               f"with fdp.nn.convert_sync_batchnorm(module), or use buffer_policy='replica0' "
               f"or 'mean'")
    same = (value == value[:1]).all()
    if compiling():
        torch._assert_async(same, message)
    elif not bool(same):
        raise ValueError(message)


def exchange_buffers(comm: Communicator, buffers: dict[str, torch.Tensor], sizes: Sequence[int],
                     policy: BufferPolicy, fn: str = "value_and_grad") -> dict[str, torch.Tensor]:
    """:func:`reduce_buffers` for replicas that each hold their own buffers (threads,
    processes): one all-gather per dtype, then every replica applies the policy to the same
    stacked values, so all of them keep bit-identical buffers (or all raise).

    ``sizes`` are every replica's row counts (``layout.sizes``); replicas without rows are left
    out, as they did not run.
    """
    if not buffers:
        return {}
    keys = list(buffers)
    active = [i for i, s in enumerate(sizes) if s > 0]
    gathered = comm.all_gather_many([buffers[k] for k in keys])
    stacked = {k: v[active] if len(active) < len(sizes) else v
               for k, v in zip(keys, gathered, strict=True)}
    return reduce_buffers(stacked, [sizes[i] for i in active], policy, fn)
