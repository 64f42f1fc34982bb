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

POLICIES = ("replica0", "mean", "sync")


def check_policy(policy: object, fn: str) -> None:
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"{fn}: unknown buffer_policy={policy!r}; use one of {POLICIES} "
                         f"(or None when loss_fn has no buffers)")


def reduce_buffers(stacked: dict[str, torch.Tensor], counts: Sequence[int], policy: str,
                   fn: str = "value_and_grad") -> dict[str, torch.Tensor]:
    """One value per buffer from ``stacked`` (leading axis: the replicas that got rows)."""
    weights = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    out = {}
    for key, value in stacked.items():
        if policy == "replica0" or value.shape[0] == 1:
            out[key] = value[0]
        elif policy == "sync":
            if not bool((value == value[:1]).all()):
                raise ValueError(
                    f"{fn}: buffer_policy='sync' but buffer {key!r} differs across replicas: "
                    f"its layer computes per-replica statistics. Convert the model's BatchNorm "
                    f"layers with fdp.nn.convert_sync_batchnorm(module), or use "
                    f"buffer_policy='replica0' or 'mean'"
                )
            out[key] = value[0]
        elif value.is_floating_point() or value.is_complex():
            w = weights.to(dtype=value.dtype if value.is_floating_point() else torch.float64,
                           device=value.device)
            w = w.reshape(-1, *([1] * (value.dim() - 1)))
            out[key] = (w * value).sum(0) / w.sum()
        else:
            out[key] = value[0]
    return out
