"""The distributed backend: one replica per process of a ``torch.distributed`` process group.

Every rank runs the same program on the same global values (same params, same global batch);
the backend makes each rank play its replica:

* a replicated value is this rank's replica with a leading axis of size 1 (the *local* axis,
  as in ``jax.pmap`` across processes): ``replicate`` broadcasts from rank 0, ``unreplicate``
  takes the local replica;
* ``scatter`` keeps this rank's rows of the global batch (padded like the vmap backend's);
  ``gather`` all-gathers every rank's rows and drops the padding, so every rank gets the batch;
* collectives inside :func:`fdp.pmap` (``psum``, ``all_gather``, ...) are c10d collectives
  (see :mod:`fdp.backends._dist_comm`), differentiable and usable under ``torch.func``
  transforms *inside* the replica;
* :func:`fdp.value_and_grad` differentiates each rank's shard with tape autograd and sums the
  loss and gradients in flat buckets: after backward (the default on CPU, where gloo needs the
  cores backward uses), or each launched as soon as backward has produced its gradients
  (``overlap=True``, the default on CUDA), as DDP. On the CPU, with every rank on this host,
  the buckets are summed through shared memory rather than gloo's sockets
  (``shared_memory``, see :mod:`fdp.backends._host_arena`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from fdp import _check, _tree
from fdp._compat import add_note
from fdp._layout import Layout
from fdp.backends import _dist_exit, _dist_module
from fdp.backends._base import GradPlan, ModuleCall, ModuleResult, Params, PyTree
from fdp.backends._comm import Communicator, Unreachable
from fdp.backends._dist_agree import Agreement, BucketLayout, layout_of
from fdp.backends._dist_comm import (
    FIRST_BUCKET_BYTES,
    DistComm,
    Launched,
    PeerFailure,
    PeerTimeout,
    bucket_sizes,
    plan_buckets,
)
from fdp.backends._host_arena import can_share
from fdp.backends._options import ReduceOp
from fdp.backends._spmd import SpmdBackend

__all__ = ["DistributedBackend", "PeerFailure", "PeerTimeout"]


_SUBGROUPS: dict[tuple, Any] = {}  # process groups over subsets of ranks (see active_comm)


class DistributedBackend(SpmdBackend):
    """One replica per rank of ``group``; this process holds replica ``rank``."""

    name = "distributed"
    ragged = True

    def __init__(self, group: Any, device: torch.device, timeout: float, bucket_bytes: int,
                 overlap: bool, shared_memory: bool | None = None) -> None:
        self.group = group
        self._comm = DistComm(group, device, timeout, bucket_bytes, shared_memory)
        self.size = self._comm.size
        self.rank = self._comm.rank
        self.device = device
        # Other processes' devices are not addressable from here: every replica is listed at
        # this process's device, which is where its values live.
        self.devices = (device,) * self.size
        self.timeout = timeout
        self.bucket_bytes = bucket_bytes
        # Overlapping, a small first bucket starts communication early (as DDP); launched all
        # at once after backward, fewer and larger buckets are cheaper.
        self.first_bucket_bytes = min(bucket_bytes, FIRST_BUCKET_BYTES) if overlap \
            else bucket_bytes
        self.overlap = overlap
        self._agreement: Agreement | None = None
        self._agreed: list[BucketLayout | None] = [None]  # the layout the ranks agreed on
        self._subcomms: dict[tuple[int, ...], Communicator | None] = {}

    @classmethod
    def create(cls, group: Any = None, *, device: Any = None, timeout: float = 300.0,
               bucket_mb: float = 25.0, overlap: bool | None = None,
               shared_memory: bool | None = None) -> DistributedBackend:
        """Validates the arguments of :meth:`fdp.Mesh.distributed` and builds the backend."""
        fn = "Mesh.distributed"
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{fn}: torch.distributed is not initialized; call "
                f"torch.distributed.init_process_group('gloo') (or 'nccl' on GPUs) in every "
                f"process first (torchrun sets the environment it reads), or run the function "
                f"with fdp.launch.run(fn, nprocs)")
        outside = group is dist.GroupMember.NON_GROUP_MEMBER  # new_group's value on non-members
        if not outside and group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{fn}: group must be a torch.distributed ProcessGroup or None "
                            f"(the default group), got {type(group).__name__}")
        if outside or dist.get_rank(group) < 0:
            raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a "
                             f"member of the given group; build the mesh only on its members")
        timeout = _check.positive_number(timeout, fn, "timeout")
        bucket_mb = _check.positive_number(bucket_mb, fn, "bucket_mb")
        for name, value in (("overlap", overlap), ("shared_memory", shared_memory)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{fn}: {name} must be a bool or None (automatic), got "
                                f"{type(value).__name__}")
        dev = _default_device(group) if device is None else _check.device(device, fn, "device")
        if shared_memory and not can_share(dev):
            raise ValueError(f"{fn}: shared_memory=True needs CPU tensors on a POSIX system "
                             f"(the mesh's device is {dev}); on GPUs NCCL moves the buckets. "
                             f"Pass shared_memory=None or False")
        # Measured (docs/performance.md): on CPU, gloo's transfers need the cores that backward
        # uses, and one bucket after backward is faster; on GPUs communication runs beside it.
        overlap = dev.type == "cuda" if overlap is None else overlap
        _dist_exit.install()  # a clean, prompt exit, also after a failed collective
        return cls(group, dev, float(timeout), max(1, int(bucket_mb * 2**20)), overlap,
                   shared_memory)

    # --- placement ----------------------------------------------------------------------------

    @property
    def local_replicas(self) -> tuple[int, ...]:
        return (self.rank,)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        return x.narrow(0, self.rank, 1)

    def active_comm(self, replicas: tuple[int, ...]) -> Communicator | None:
        """A process group over the ranks that received rows (every rank calls this, in the
        same order, so that the group is created collectively on first use).

        Creating a group needs every rank of the default group, so this works for meshes over
        the whole world (torchrun's usual case); on a subgroup the loss's collectives raise.
        """
        if replicas not in self._subcomms:
            whole = self.group is None or self.group == dist.group.WORLD
            if not whole:
                self._subcomms[replicas] = Unreachable(len(replicas), (
                    f"a collective inside loss_fn on a distributed mesh over a process "
                    f"subgroup, with ranks that received no rows (only ranks {list(replicas)} "
                    f"of {self.size} did): the ranks with rows cannot be grouped here. Use "
                    f"split='even' with at least {self.size} rows per batch (drop the last, "
                    f"short batch), or a mesh over the whole world"))
            else:
                key = (replicas, id(dist.group.WORLD))
                if key not in _SUBGROUPS:  # one group per set of ranks, for the process
                    _SUBGROUPS[key] = dist.new_group(ranks=list(replicas))
                group = _SUBGROUPS[key]
                self._subcomms[replicas] = (
                    DistComm(group, self.device, self.timeout, self.bucket_bytes,
                             self._comm.shared_memory)
                    if self.rank in replicas else None)
        return self._subcomms[replicas]

    def comm(self) -> DistComm:
        return self._comm

    @property
    def process_index(self) -> int:
        return self.rank

    def agree(self, ok: bool, fn: str) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int64, device=self.device)
        self._comm.check([fn, "agree"], fn)  # every rank is at the same call, or a clear error
        return bool(self._comm._all_reduce(flag, "min", fn).item())

    @property
    def home(self) -> torch.device:
        return self.device

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a distributed Mesh cannot be pickled: it stands for this process's "
                        "process group; build it with fdp.Mesh.distributed() where it is used")

    def run_module(self, call: ModuleCall) -> ModuleResult:
        """DataParallel on processes: every rank runs its rows and gets the whole output;
        backward sums the parameters' gradients over the ranks (see ``_dist_module``)."""
        return _dist_module.run_module(self._comm, self.device, call)

    def run_replicas(self, fn: Callable[[int], Any]) -> list[Any]:
        try:
            return [fn(self.rank)]
        except BaseException as e:  # the peers fail within the timeout instead of hanging
            add_note(e, f"raised in replica {self.rank} of {self.size} (global rank "
                       f"{dist.get_rank()}, device {self.device}) of a distributed mesh")
            raise

    # --- primitives on the local leading axis ---------------------------------------------

    def replicate(self, x: torch.Tensor) -> torch.Tensor:
        return self._comm.broadcast(x, 0).unsqueeze(0)

    def unreplicate(self, x: torch.Tensor) -> torch.Tensor:
        return x[0]

    def shard(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = x.to(self.device)
        dim = layout.dim % x.dim()
        off, rows, m = layout.offsets[self.rank], layout.sizes[self.rank], layout.max_size
        if rows == m:  # a view: no copy
            return x.narrow(dim, off, rows).unsqueeze(0)
        index = layout.padded_index(x.device)[self.rank * m:(self.rank + 1) * m]
        return x.index_select(dim, index).unsqueeze(0)

    def unshard(self, x: torch.Tensor, layout: Layout, dim: int) -> torch.Tensor:
        everyone = self._comm.all_gather(x[0])
        flat = everyone.movedim(0, dim).flatten(dim, dim + 1)
        if layout.even:
            return flat
        return flat.index_select(dim, layout.real_index(flat.device))

    def all_reduce(self, x: torch.Tensor, op: ReduceOp,
                   weights: torch.Tensor | None) -> torch.Tensor:
        mine = x[0]
        if weights is None:
            return self._comm.all_reduce(mine, op).unsqueeze(0)
        w = weights.to(dtype=mine.dtype, device=mine.device)
        # where, not w * x: a replica with weight 0 (no rows) may hold NaN (a 0/0 mean)
        term = torch.where(w[self.rank] > 0, w[self.rank] * mine, 0)
        return (self._comm.all_reduce(term, "sum") / w.sum()).unsqueeze(0)

    # --- value_and_grad -----------------------------------------------------------------------

    def value_and_grad(self, plan: GradPlan, params: Params,
                       batch: PyTree) -> tuple[Any, Params]:
        """SpmdBackend's step, checking that every rank passes the same param shapes, batch
        shapes and split: in steady state by a fingerprint in the last gradient bucket, with
        no collective of its own (see ``_dist_agree``)."""
        parts = _describe(plan, params, batch)
        parts += [f"unused={plan.unused}",
                  f"buckets of {self.bucket_bytes} bytes, the first {self.first_bucket_bytes}"]
        self._agreement = Agreement(self._comm, parts, self._agreed)
        if self.device.type == "cuda":  # the first call's check reads its result on the host:
            self._agreement.finish_check()  # before queuing forward, not amid backward
        try:
            return super().value_and_grad(plan, params, batch)
        finally:
            self._agreement = None

    def backward_and_reduce(self, comm: Communicator, term: torch.Tensor, params: Params,
                            keep_none: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        reducer = _Reducer(self, term, list(params.values()), keep_none)
        if term.requires_grad and self.overlap:
            leaves = list(params.values())
            hooks = [p.register_post_accumulate_grad_hook(reducer.hook(len(leaves) - i))
                     for i, p in enumerate(leaves)]
            try:
                torch.autograd.backward(term, inputs=leaves)
            finally:
                for h in hooks:
                    h.remove()
        elif term.requires_grad:
            computed = torch.autograd.grad(term, list(params.values()), allow_unused=True)
            for i, g in enumerate(computed):
                reducer.ready(len(computed) - i, g)
        loss, *grads = reducer.finish()
        had = grads.pop() if keep_none else None
        out: dict[str, Any] = dict(zip(params, reversed(grads), strict=True))
        if had is not None:  # None where no rank had a gradient (counted in the last bucket)
            out = {k: g if n > 0 else None
                   for (k, g), n in zip(out.items(), had.tolist(), strict=True)}
        # a copy: a view would keep the whole first bucket alive (and out of reuse)
        return loss.to(term.dtype, copy=True), out

    def _call_agreement(self) -> Agreement | None:
        """The cross-rank check of the ``value_and_grad`` call in progress."""
        return self._agreement


class _Reducer:
    """Sums ``[term, *reversed(params' grads)]`` over ranks in buckets, launched in order.

    Items are numbered in the order backward produces gradients (last layer first), with the
    loss term as item 0; then, with ``count_grads``, how many ranks had each parameter's
    gradient (filled in at :meth:`finish`), and last the call's fingerprint (``_dist_agree``):
    both ride in the last bucket, no extra collective. Bucket ``k`` starts once all its items
    are ready and buckets ``0..k-1`` have started, so every rank launches the same buckets in
    the same order even if its gradients arrive in another order.
    """

    _plans: ClassVar[dict[tuple, tuple[list[list[int]], list[int]]]] = {}

    def __init__(self, backend: DistributedBackend, term: torch.Tensor,
                 leaves: list[torch.Tensor], count_grads: bool = False) -> None:
        self.backend, self.comm = backend, backend.comm()
        # the loss travels in the params' dtype, so every replica's buckets match
        loss = term.detach().to(leaves[0].dtype)
        counts = [torch.zeros(len(leaves), dtype=leaves[0].dtype, device=leaves[0].device)]
        self.agreement = backend._call_agreement()
        fp = self.agreement.fingerprint(loss) if self.agreement is not None else None
        self.like = [loss, *reversed(leaves), *(counts if count_grads else []),
                     *([fp] if fp is not None else [])]
        self.buckets, self.owner = self._plan(self.like, backend.bucket_bytes,
                                              backend.first_bucket_bytes)
        self.layout = None if fp is None else layout_of(self.like, backend.bucket_bytes,
                                                        backend.first_bucket_bytes)
        self.values: list[torch.Tensor | None] = [loss, *([None] * (len(self.like) - 1))]
        self.params, self.count_grads = len(leaves), count_grads
        self.missing = [len(b) for b in self.buckets]
        self.missing[self.owner[0]] -= 1
        self.fp_at = None if fp is None else len(self.like) - 1
        if self.fp_at is not None:
            self.values[self.fp_at] = fp
            self.missing[self.owner[self.fp_at]] -= 1
        self.launched: list[Launched] = []

    @classmethod
    def _plan(cls, like: list[torch.Tensor], bucket_bytes: int,
              first_bytes: int) -> tuple[list, list]:
        key = (bucket_bytes, first_bytes, *((x.dtype, x.numel()) for x in like))
        plan = cls._plans.get(key)
        if plan is None:
            buckets = plan_buckets(like, bucket_bytes, first_bytes)
            owner = [0] * len(like)
            for b, idx in enumerate(buckets):
                for i in idx:
                    owner[i] = b
            if len(cls._plans) > 256:
                cls._plans.clear()
            plan = cls._plans[key] = (buckets, owner)
        return plan

    def hook(self, item: int) -> Callable[[torch.Tensor], None]:
        return lambda p: self.ready(item, p.grad)

    def ready(self, item: int, grad: torch.Tensor | None) -> None:
        self.values[item] = grad
        self.missing[self.owner[item]] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while len(self.launched) < len(self.buckets) and self.missing[len(self.launched)] == 0:
            if not self.launched:  # once per call: first every rank's buckets must match
                if self.agreement is not None:
                    self.agreement.settle(self.layout)
                self.comm.prepare(bucket_sizes(self.like, self.buckets), "value_and_grad")
            idx = self.buckets[len(self.launched)]
            values = [self._value(i) for i in idx]
            self.launched.append(self.comm.launch(values, list(range(len(idx))), "sum"))

    def _value(self, item: int) -> torch.Tensor:
        v = self.values[item]
        return torch.zeros_like(self.like[item]) if v is None else v

    def finish(self) -> list[torch.Tensor]:
        """Launches what is left (unused params count as zero) and waits for every bucket."""
        if self.count_grads:  # params are items 1..P, last layer first; then the counts
            params = self.params
            self.values[params + 1] = torch.tensor(
                [self.values[params - j] is not None for j in range(params)],
                dtype=self.like[0].dtype, device=self.like[0].device)
        for b in range(len(self.buckets)):
            self.missing[b] = 0
        self._launch_ready()
        out: list[torch.Tensor | None] = [None] * len(self.like)
        for idx, started in zip(self.buckets, self.launched, strict=True):
            parts = self.comm.finish(started, "sum", "value_and_grad",
                                     [self.like[i] for i in idx])
            for i, part in zip(idx, parts, strict=True):
                out[i] = part
        if self.fp_at is not None and self.agreement is not None:
            self.agreement.verify(out.pop(self.fp_at))  # type: ignore[arg-type]
        return out  # type: ignore[return-value]


def _describe(plan: GradPlan, params: Params, batch: PyTree) -> list[str]:
    layout = plan.layout
    parts = [f"strategy={plan.strategy}", f"split={list(layout.sizes)} at dim={layout.dim}"]
    parts += [f"params[{k!r}]: {_kind(v)}" for k, v in params.items()]
    parts += [f"{path}: {_kind(x) if isinstance(x, torch.Tensor) else type(x).__name__}"
              for path, x in _tree.leaves_with_path(batch, "batch")]
    return parts


def _kind(x: torch.Tensor) -> str:
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"


def _default_device(group: Any) -> torch.device:
    """``cuda:<local rank>`` on an NCCL group, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) if local is not None
                            else torch.cuda.current_device())
    return torch.device("cpu")
