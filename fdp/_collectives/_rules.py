"""The collectives' autograd functions: vmap rules (vmap backend) and communicator calls.

Each :func:`fdp.pmap` call binds an *axis frame* for the duration of the mapped function: its
name, size, and ``index``, a tensor that holds the replica index and is batched at exactly that
pmap's vmap level. A collective is an ``autograd.Function`` whose operands are the value and that
index. functorch calls the custom ``vmap`` rule at every vmap level where some operand is batched:

* at a level where only the value is batched (a vmap nested inside the pmap), the rule passes
  the value through, one level down;
* at the frame's own level the index is batched, so the rule reduces over the value's batch dim,
  or, when the value is not batched there (a replicated value, such as a constant), uses the
  closed form (``psum(x) = N * x``). This is what makes ``psum(1.0) == N``, not ``1``.

The reductions at the frame's level are ordinary differentiable torch ops, so ``grad`` outside
the pmap sees the right transpose; ``backward`` covers ``grad`` inside the pmap
(``psum`` transposes to ``psum``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fdp import _tree
from fdp._compat import compiling, in_forward_ad, in_functorch_transform
from fdp._explain import forward_ad_in_threads
from fdp.backends._comm import Communicator
from fdp.backends._options import ReduceOp

__all__ = ["AllGather", "AllReduce", "CommAllGather", "CommAllReduce", "comm_all_gather",
           "comm_all_reduce", "guard_compile", "guard_forward_ad", "on_shared_tape",
           "tree_collective"]

InDims = tuple[int | None, ...]
Batched = tuple[torch.Tensor, int | None]  # a vmap rule's output and its batch dim


def guard_compile(fn: str) -> None:
    if compiling():
        raise RuntimeError(
            f"fdp.{fn} cannot be traced by torch.compile: the compiler drops custom vmap "
            f"rules (pytorch#129845) and would silently skip the collective. Compile the "
            f"fused step (fdp.value_and_grad) instead, or keep the pmap with collectives eager."
        )


def guard_forward_ad(fn: str, comm: Communicator | None) -> None:
    """Refuses a collective inside ``torch.func.jvp`` where the replicas cannot each run
    forward-mode AD (threads: one process-wide forward-AD state, which no lock can share
    when every replica must be inside its jvp at once to meet in the collective)."""
    if comm is not None and not comm.forward_ad and in_forward_ad():
        raise forward_ad_in_threads(f"fdp.{fn} inside torch.func.jvp (or jacfwd, hessian)")


def _reduce(op: ReduceOp, x: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    if dim is None:  # replicated value: closed form
        if op == "sum":
            return x * n
        return x.clone()
    if op == "sum":
        return x.sum(dim, dtype=x.dtype)  # integers keep their dtype, as in JAX
    if op == "mean":
        return x.mean(dim)
    if op == "max":
        return x.amax(dim)
    return x.amin(dim)


def _extreme_backward(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      psum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """pmax/pmin's transpose: the replicas that hold the extreme value ``y`` share the summed
    cotangent equally (as ``torch.amax``)."""
    hit = (x == y).to(g.dtype)
    return psum(g) * hit / psum(hit)


def _extreme_jvp(x_t: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 psum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """pmax/pmin's tangent: the mean of the tangents of the replicas that hold ``y``."""
    hit = (x == y).to(x_t.dtype)
    return psum(x_t * hit) / psum(hit)


class AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor, op: ReduceOp, n: int) -> torch.Tensor:
        raise RuntimeError("fdp internal error: collective evaluated outside its vmap level")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, index, op, n = inputs
        ctx.index, ctx.op, ctx.n = index, op, n
        if op in ("max", "min"):
            ctx.save_for_backward(x, output)
            ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        if ctx.op in ("sum", "mean"):
            return AllReduce.apply(g, ctx.index, ctx.op, ctx.n), None, None, None
        x, y = ctx.saved_tensors
        total = _extreme_backward(g, x, y,
                                  lambda t: AllReduce.apply(t, ctx.index, "sum", ctx.n))
        return total, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        if ctx.op in ("sum", "mean"):
            return AllReduce.apply(x_t, ctx.index, ctx.op, ctx.n)
        x, y = ctx.saved_tensors
        return _extreme_jvp(x_t, x, y,
                            lambda t: AllReduce.apply(t, ctx.index, "sum", ctx.n))

    @staticmethod
    def vmap(info: Any, in_dims: InDims, x: torch.Tensor, index: torch.Tensor, op: ReduceOp, n: int
             ) -> Batched:
        x_dim, index_dim = in_dims[0], in_dims[1]
        if index_dim is None:  # a vmap level inside the pmap: pass through
            return AllReduce.apply(x, index, op, n), x_dim
        return _reduce(op, x, x_dim, n), None


class AllGather(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor, axis: int, n: int) -> torch.Tensor:
        raise RuntimeError("fdp internal error: collective evaluated outside its vmap level")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, ctx.index, ctx.axis, ctx.n = inputs

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        total = AllReduce.apply(g, ctx.index, "sum", ctx.n)
        own = total.index_select(ctx.axis, ctx.index.reshape(1)).squeeze(ctx.axis)
        return own, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        return AllGather.apply(x_t, ctx.index, ctx.axis, ctx.n)

    @staticmethod
    def vmap(info: Any, in_dims: InDims, x: torch.Tensor, index: torch.Tensor, axis: int, n: int
             ) -> Batched:
        x_dim, index_dim = in_dims[0], in_dims[1]
        if index_dim is None:  # a vmap level inside the pmap: keep its batch dim in front
            assert x_dim is not None  # functorch calls the rule where an operand is batched
            return AllGather.apply(x.movedim(x_dim, 0), index, axis + 1, n), 0
        if x_dim is None:
            return torch.stack([x] * n, axis), None
        return x.movedim(x_dim, axis), None


class CommAllReduce(torch.autograd.Function):
    """A collective through a communicator (threads and distributed backends).

    ``tape`` says whether the frame may put its collectives on the replicas' shared tape
    (:func:`on_shared_tape`); :meth:`apply` then computes the result from every replica's
    tracked input instead, at whichever level it is called: also where ``torch.func`` lowers
    the collective (and its backward) to plain tensors, so that an outer ``.backward()`` finds
    no rendezvous in the graph.
    """

    @classmethod
    def apply(cls, x: torch.Tensor, comm: Communicator, op: ReduceOp,
              tape: bool = False) -> torch.Tensor:
        if on_shared_tape(tape):
            return comm.tracked_all_reduce(x, op)
        return super().apply(x, comm, op, tape)

    @staticmethod
    def forward(x: torch.Tensor, comm: Communicator, op: ReduceOp, tape: bool) -> torch.Tensor:
        return comm.all_reduce(x, op)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, comm, ctx.op, ctx.tape = inputs
        ctx.comm = comm.pinned()  # backward may run in an autograd engine thread
        if ctx.op in ("max", "min"):
            ctx.save_for_backward(x, output)
            ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        if ctx.op in ("sum", "mean"):
            return CommAllReduce.apply(g, ctx.comm, ctx.op, ctx.tape), None, None, None
        x, y = ctx.saved_tensors
        total = _extreme_backward(g, x, y,
                                  lambda t: CommAllReduce.apply(t, ctx.comm, "sum", ctx.tape))
        return total, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        if ctx.op in ("sum", "mean"):
            return CommAllReduce.apply(x_t, ctx.comm, ctx.op, ctx.tape)
        x, y = ctx.saved_tensors
        return _extreme_jvp(x_t, x, y,
                            lambda t: CommAllReduce.apply(t, ctx.comm, "sum", ctx.tape))

    @staticmethod
    def vmap(info: Any, in_dims: InDims, x: torch.Tensor, comm: Communicator, op: ReduceOp,
             tape: bool) -> Batched:
        # A vmap inside the replica: every replica has the same vmapped size, so one
        # elementwise collective over the stacked values serves all vmapped entries.
        if in_dims[0] is None:
            return CommAllReduce.apply(x, comm, op, tape), None
        return CommAllReduce.apply(x.movedim(in_dims[0], 0), comm, op, tape), 0


class CommAllGather(torch.autograd.Function):
    """An all-gather through a communicator; ``tape`` as for :class:`CommAllReduce`."""

    @classmethod
    def apply(cls, x: torch.Tensor, comm: Communicator, axis: int,
              tape: bool = False) -> torch.Tensor:
        if on_shared_tape(tape):
            return comm.tracked_all_gather(x).movedim(0, axis)
        return super().apply(x, comm, axis, tape)

    @staticmethod
    def forward(x: torch.Tensor, comm: Communicator, axis: int, tape: bool) -> torch.Tensor:
        return comm.all_gather(x).movedim(0, axis)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, comm, ctx.axis, ctx.tape = inputs
        ctx.comm = comm.pinned()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        total = CommAllReduce.apply(g, ctx.comm, "sum", ctx.tape)
        return total.select(ctx.axis, ctx.comm.index()), None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        return CommAllGather.apply(x_t, ctx.comm, ctx.axis, ctx.tape)

    @staticmethod
    def vmap(info: Any, in_dims: InDims, x: torch.Tensor, comm: Communicator, axis: int,
             tape: bool) -> Batched:
        if in_dims[0] is None:
            return CommAllGather.apply(x, comm, axis, tape), None
        return CommAllGather.apply(x.movedim(in_dims[0], 0), comm, axis + 1, tape), 0


@torch.compiler.disable  # always eager: dynamo cannot trace the rendezvous (nor the override)
def comm_all_reduce(x: torch.Tensor, comm: Communicator, op: ReduceOp,
                    tape: bool) -> torch.Tensor:
    """:class:`CommAllReduce` of a frame's communicator (``tape``: the frame's)."""
    return CommAllReduce.apply(x, comm, op, tape)


@torch.compiler.disable
def comm_all_gather(x: torch.Tensor, comm: Communicator, axis: int,
                    tape: bool) -> torch.Tensor:
    """:class:`CommAllGather` of a frame's communicator (``tape``: the frame's)."""
    return CommAllGather.apply(x, comm, axis, tape)


def on_shared_tape(tape: bool) -> bool:
    """Whether a collective of a frame with ``tape`` joins the replicas' autograd graphs
    (threads backend): its output is then built from the other replicas' tracked inputs, so
    the graph itself spans replicas and its backward needs no rendezvous.

    A ``.backward()`` after a threads-backend ``pmap`` runs every replica's backward in one
    engine thread, where a rendezvous of cotangents cannot happen. That holds for plain tape
    autograd in the replica, and equally for the plain-tensor level of a ``torch.func``
    transform inside it: ``torch.func.grad`` computes its gradient (the collective's backward,
    a collective again, run by each replica in its own thread) with a graph on the outer tape,
    which an outer ``.backward()`` differentiates. Inside the transform itself (a functorch
    level) the collective is an ``autograd.Function`` whose backward is a collective, as in
    JAX (``psum`` transposes to ``psum``). ``value_and_grad``'s frames have no tape: each
    replica differentiates its own graph, in its own thread.

    Decided per frame and call site, never per tensor: every replica must take the same path.
    """
    return tape and torch.is_grad_enabled() and not in_functorch_transform()


def tree_collective(tree: Any, fn: str, leaf_op: Any) -> Any:
    """Applies ``leaf_op`` to every tensor (or Python number) leaf; ``None`` stays ``None``."""

    def apply(path: str, leaf: Any) -> Any:
        if leaf is None:
            return None
        if isinstance(leaf, (bool, int, float, complex)):
            leaf = torch.as_tensor(leaf)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}: {path} is a {type(leaf).__name__}; collectives take "
                            f"tensors, Python numbers and None")
        return leaf_op(leaf)

    return _tree.map_with_path(apply, tree, root="x")
