"""Stacked placement: replicated values as one tensor with a leading replica axis on the
backend's home device (the vmap backend, and the threads backend outside its replica threads)."""

from __future__ import annotations

import torch

from fdp._layout import Layout
from fdp.backends._base import Backend
from fdp.backends._options import ReduceOp


class StackedPlacement(Backend):
    """The primitives for values that hold every replica, stacked on :attr:`home`."""

    def replicate(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.home)  # no copy when already there
        return x.unsqueeze(0).expand(self.size, *x.shape)  # zero-copy

    def unreplicate(self, x: torch.Tensor) -> torch.Tensor:
        return x[0]

    def shard(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = x.to(self.home)
        dim = layout.dim % x.dim()
        if layout.even:  # a view: no copy
            return x.unflatten(dim, (self.size, layout.max_size)).movedim(dim, 0)
        rows = x.index_select(dim, layout.padded_index(x.device))
        return rows.unflatten(dim, (self.size, layout.max_size)).movedim(dim, 0)

    def unshard(self, x: torch.Tensor, layout: Layout, dim: int) -> torch.Tensor:
        flat = x.movedim(0, dim).flatten(dim, dim + 1)
        if layout.even:
            return flat
        return flat.index_select(dim, layout.real_index(x.device))

    def all_reduce(self, x: torch.Tensor, op: ReduceOp,
                   weights: torch.Tensor | None) -> torch.Tensor:
        if weights is not None:
            w = weights.to(dtype=x.dtype, device=x.device)
            w = w.reshape(self.size, *([1] * (x.dim() - 1)))
            # where, not w * x: a replica with weight 0 (no rows) may hold NaN (a 0/0 mean)
            out = torch.where(w > 0, w * x, 0).sum(0) / w.sum()
        elif op == "sum":
            out = x.sum(0)
        elif op == "mean":
            out = x.mean(0)
        elif op == "max":
            out = x.amax(0)
        else:
            out = x.amin(0)
        return self.replicate(out)
