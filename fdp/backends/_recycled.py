"""``Recycled``: the flat buffers of a communicator's earlier results, reused once dead.

Every reduced bucket is a new flat tensor, and the gradients handed out are views of it. A
buffer of more than 128 KiB comes from ``mmap`` and goes back to the kernel when freed, so a
fresh one faults in every page on every call: about 0.3 ms for the 2.7 MB of the bench's MLP,
around a tenth of what the reduction itself costs through shared memory. Inside
``fdp.data_parallel_step`` the gradients die within the step; the next call then writes into
the same buffer.

A buffer is reused only when nothing but this object reaches its storage: c10's storage use
count and the reference count of the cached storage object are back to what they were when
the buffer was made (the check ``fdp/_step_memory.py`` uses for recycled states). A caller who
keeps the gradients (``value_and_grad``'s result) gets a fresh buffer next time; nothing it
holds is ever written.
"""

from __future__ import annotations

import sys

import torch

from fdp._compat import storage_use_count
from fdp.optim._into import BIG  # elements: smaller buffers come without page faults

KEEP = 8  # buffers kept; the least recently used goes first


class _Kept:
    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.storage = flat.untyped_storage()  # torch caches this object: see the docstring
        self.alone = self._holders()

    def _holders(self) -> tuple[int, int]:
        return storage_use_count(self.flat), sys.getrefcount(self.storage)

    def free(self, dtype: torch.dtype, numel: int, device: torch.device) -> bool:
        return (self.flat.dtype == dtype and self.flat.numel() == numel
                and self.flat.device == device and self._holders() == self.alone
                and not self.flat.is_shared())


class Recycled:
    """Flat buffers to write results into: a dead earlier one, or a new one (kept)."""

    def __init__(self) -> None:
        self._kept: list[_Kept] = []

    def empty(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        """A flat tensor whose contents are undefined, to be overwritten whole.

        It is a new alias of the kept buffer: while the caller holds it (or views of it),
        the buffer counts as used.
        """
        if numel < BIG:
            return torch.empty(numel, dtype=dtype, device=device)
        for i, kept in enumerate(self._kept):
            if kept.free(dtype, numel, device):
                self._kept.append(self._kept.pop(i))  # most recently used last
                return kept.flat.view(numel)
        kept = _Kept(torch.empty(numel, dtype=dtype, device=device))
        self._kept.append(kept)
        if len(self._kept) > KEEP:
            self._kept.pop(0)
        return kept.flat.view(numel)
