"""Split rules and the ``Sharded`` container that :func:`fdp.scatter` returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fdp import _check
from fdp._compat import pytree
from fdp.backends._options import SPLIT_NAMES, SplitRule

__all__ = ["Layout", "Sharded", "SplitRule", "split_sizes"]


@dataclass(frozen=True)
class Layout:
    """How a batch of ``sum(sizes)`` rows is split along ``dim``: replica ``i`` gets ``sizes[i]``.

    Rows stay in order: replica ``i`` holds rows ``offsets[i] : offsets[i] + sizes[i]``.
    """

    sizes: tuple[int, ...]
    dim: int = 0

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    def counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Real rows per replica, shape ``[N]`` (int64)."""
        return torch.tensor(self.sizes, dtype=torch.int64, device=device)

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N, max_size]`` bool mask, True on real rows and False on padding."""
        rows = torch.arange(self.max_size, device=device)
        return rows.unsqueeze(0) < self.counts(device).unsqueeze(1)

    def padded_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Row index into the batch for each padded slot, ``[N * max_size]``.

        Padding slots repeat the replica's last real row (row 0 of the batch for an empty
        replica), so padded rows hold real data and never produce inf/NaN that could leak
        into masked reductions.
        """
        idx: list[int] = []
        m = self.max_size  # once: a property costs O(N)
        for off, s in zip(self.offsets, self.sizes, strict=True):
            last = off + s - 1 if s > 0 else 0
            idx.extend(range(off, off + s))
            idx.extend([last] * (m - s))
        return torch.tensor(idx, dtype=torch.int64, device=device)

    def real_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Positions of the real rows in the flattened ``[N * max_size]`` padded axis."""
        m = self.max_size
        idx = [i * m + r for i, s in enumerate(self.sizes) for r in range(s)]
        return torch.tensor(idx, dtype=torch.int64, device=device)

    def active_position(self, first_row: int) -> int:
        """How many replicas with rows hold rows before ``first_row``: the index, among the
        replicas that run, of the one whose shard starts there."""
        return sum(1 for off, s in zip(self.offsets, self.sizes, strict=True)
                   if s > 0 and off < first_row)

    @property
    def active_count(self) -> int:
        """The number of replicas that receive rows."""
        return sum(1 for s in self.sizes if s > 0)

    def groups(self) -> list[tuple[int, int, int]]:
        """Runs of consecutive replicas with equal non-zero size: ``(first_row, k, size)``."""
        runs: list[tuple[int, int, int]] = []
        for off, s in zip(self.offsets, self.sizes, strict=True):
            if s == 0:
                continue
            if runs and runs[-1][2] == s and runs[-1][0] + runs[-1][1] * s == off:
                first, k, _ = runs[-1]
                runs[-1] = (first, k + 1, s)
            else:
                runs.append((off, 1, s))
        return runs


def split_sizes(batch_size: int, n: int, split: str | Sequence[int],
                fn: str = "scatter") -> tuple[int, ...]:
    """Per-replica row counts of a batch of ``batch_size`` rows over ``n`` replicas (``split``
    is checked: a rule's name or one count per replica)."""
    if isinstance(split, str):
        if split == "chunk":
            # torch.chunk's rule (nn.DataParallel's scatter): ceil-sized chunks, then empties.
            chunk = -(-batch_size // n)
            full = batch_size // chunk  # not divmod: dynamo cannot trace it on SymInts
            rest = batch_size - full * chunk
            chunks = [chunk] * full + ([rest] if rest else [])
            return tuple(chunks + [0] * (n - len(chunks)))
        if split == "even":
            base = batch_size // n
            extra = batch_size - base * n
            return tuple(base + 1 if i < extra else base for i in range(n))
        raise ValueError(
            f"{fn}: unknown split={split!r}; use {', '.join(map(repr, SPLIT_NAMES))} or a list "
            f"of row counts, one per replica"
        )
    try:
        sizes = tuple(split)
    except TypeError:
        raise TypeError(
            f"{fn}: split must be 'chunk', 'even' or a sequence of ints, got "
            f"{type(split).__name__}"
        ) from None
    odd = next((i for i, s in enumerate(sizes) if not _check.is_int(s)), None)
    if odd is not None:
        raise TypeError(f"{fn}: split[{odd}]={sizes[odd]!r} is a {type(sizes[odd]).__name__}; "
                        f"split lists {n} ints (row counts), one per replica")
    if len(sizes) != n:
        raise ValueError(f"{fn}: split={list(sizes)} must list {n} ints, one per replica")
    if any(s < 0 for s in sizes):
        raise ValueError(f"{fn}: split={list(sizes)} has a negative row count")
    if sum(sizes) != batch_size:
        raise ValueError(
            f"{fn}: split={list(sizes)} sums to {sum(sizes)} but the batch has {batch_size} "
            f"rows; the sizes must add up to the batch size"
        )
    return tuple(sizes)


@dataclass(frozen=True)
class Sharded:
    """A batch split over a mesh: ``data`` has a leading replica axis (padded if uneven).

    Attributes:
        data: the input tree; every tensor leaf has shape ``[N, ..., max_size, ...]`` with the
            padded batch axis at ``layout.dim + 1``; non-tensor leaves are broadcast.
        layout: the per-replica row counts.
    """

    data: Any
    layout: Layout

    @property
    def counts(self) -> torch.Tensor:
        """Real rows per replica, ``[N]`` int64, on the device of the data."""
        return self.layout.counts(self._device())

    @property
    def mask(self) -> torch.Tensor:
        """A bool tensor of shape ``[N, max_size]``, True on real rows (pass it to pmap with
        in_axes=0)."""
        return self.layout.mask(self._device())

    def _device(self) -> torch.device | None:
        leaves = [x for x in pytree.tree_leaves(self.data)
                  if isinstance(x, torch.Tensor)]
        return leaves[0].device if leaves else None
