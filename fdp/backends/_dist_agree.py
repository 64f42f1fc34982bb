"""How the ranks of a distributed mesh agree that ``value_and_grad`` got the same inputs, with
no collective of its own in steady state.

Every rank describes its call (``parts``: strategy, split, each param's and batch leaf's dtype
and shape, ...). The description's CRC-32, as 32 elements of 0 or 1 plus a *changed* flag (the
*fingerprint*, 33 elements in the params' dtype), rides as the last item of the gradient
all-reduce's buckets: no collective of its own. After the sum every rank holds the same totals,
and the ranks agree iff every total is 0 or N, a decision that every rank takes from the same
numbers, so all raise together or none does. On a disagreement every rank gathers the
descriptions (``all_gather_object``) and raises the ``ValueError`` naming the first difference.

That needs the buckets themselves to match: their sizes come from the params' dtypes and sizes
(the *bucket layout*): gloo aborts the process on an all-reduce whose sizes differ between
ranks, and buckets summed through shared memory (``_host_arena``) would read the wrong bytes
(their segments also grow only on sizes every rank shares). So the mesh remembers the layout
that its ranks last agreed on (the same on every rank: it changes only on decisions that every
rank takes from the same numbers), and a call:

* with that layout adds nothing (steady state);
* on a mesh without an agreed layout (its first call) first compares the description's CRC with
  one all-gather of an int64, launched at the start of the call, as before;
* with another layout cannot know whether the other ranks changed too, so it first sends
  exactly what a rank that kept the agreed layout sends: that layout's buckets, zeros with its
  fingerprint flagged *changed*. From those totals every rank sees whether all changed alike
  (then the new layout is agreed) or not (every rank raises). This costs one all-reduce of the
  old layout's size, once per change of layout: alternating models of different sizes on one
  mesh pay it every call (give each model its own mesh).

A params dtype that cannot count to N exactly (bfloat16 beyond 256 ranks) gets no fingerprint:
every call then compares CRCs first (the all-gather).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from fdp.backends._dist_comm import DistComm, PendingCheck, mismatch_message, plan_buckets

FN = "value_and_grad"
BITS = 32  # of the CRC-32; one more element holds the "changed" flag
Spec = tuple[tuple[torch.dtype, int], ...]  # (dtype, numel) of every item the buckets reduce
BucketLayout = tuple[int, int, Spec]  # bucket bytes, first bucket's bytes, items


def counts_exactly(dtype: torch.dtype, size: int) -> bool:
    """Whether sums of 0/1 over ``size`` ranks are exact in ``dtype``.

    Example:
        >>> counts_exactly(torch.bfloat16, 256), counts_exactly(torch.bfloat16, 257)
        (True, False)
    """
    return dtype.is_floating_point and size <= 2 / torch.finfo(dtype).eps


def layout_of(like: list[torch.Tensor], bucket_bytes: int,
              first_bytes: int) -> BucketLayout:
    return bucket_bytes, first_bytes, tuple((x.dtype, x.numel()) for x in like)


class Agreement:
    """The agreement of one ``value_and_grad`` call on ``comm`` (see the module docstring).

    ``memory`` is the mesh's record of the agreed layout (``memory[0]``, ``None`` before one):
    the call reads it at the start and updates it once the ranks have agreed.
    """

    def __init__(self, comm: DistComm, parts: list[str],
                 memory: list[BucketLayout | None]) -> None:
        self.comm, self.parts, self.memory = comm, parts, memory
        self.agreed = memory[0]
        self.settled = comm.size == 1  # nobody to disagree with
        self.pending: PendingCheck | None = None
        if not self.settled and self.agreed is None:
            self.pending = comm.start_check(parts, FN)

    def finish_check(self) -> None:
        """Waits for the first call's CRC comparison, if any (raises on a mismatch)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.verify()

    def fingerprint(self, like: torch.Tensor, changed: bool = False) -> torch.Tensor | None:
        """The fingerprint to reduce with the gradients, in ``like``'s dtype and device."""
        if self.comm.size == 1 or not counts_exactly(like.dtype, self.comm.size):
            return None
        code = zlib.crc32("\n".join(self.parts).encode())
        bits = [(code >> i) & 1 for i in range(BITS)] + [int(changed)]
        return torch.tensor(bits, dtype=like.dtype, device=like.device)

    def settle(self, layout: BucketLayout | None) -> None:
        """Before the first bucket: makes sure every rank's buckets have the same sizes.

        ``layout`` is this call's, or ``None`` when it carries no fingerprint.
        """
        if self.settled:
            return
        self.settled = True
        if self.agreed is None:
            self.finish_check()
        elif layout == self.agreed:
            return  # steady state: the fingerprint in the last bucket checks the rest
        else:
            self._replay(self.agreed)
        self.memory[0] = layout

    def _replay(self, layout: BucketLayout) -> None:
        """Sends what a rank that kept ``layout`` sends, flagged changed, and decides."""
        bucket_bytes, first_bytes, spec = layout
        like = [torch.zeros(n, dtype=d, device=self.comm.device) for d, n in spec]
        fp = self.fingerprint(like[-1], changed=True)
        assert fp is not None  # an agreed layout always carries a fingerprint
        like[-1] = fp
        buckets = plan_buckets(like, bucket_bytes, first_bytes)
        self.verify(self.comm.reduce_buckets(like, "sum", buckets, FN)[-1])

    def verify(self, total: torch.Tensor) -> None:
        """Raises ``ValueError`` on every rank unless every rank sent the same fingerprint."""
        size = self.comm.size
        if bool(((total == 0) | (total == size)).all()):
            return
        seen: list[Any] = [None] * size
        dist.all_gather_object(seen, self.parts, group=self.comm.group)
        raise ValueError(mismatch_message(FN, seen))
