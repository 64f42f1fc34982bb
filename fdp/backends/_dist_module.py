"""``fdp.DataParallel`` on a distributed mesh: one replica per process, nn.DataParallel's
interface.

Every rank runs the same program on the same global batch (as ``fdp.data_parallel_step`` on
this mesh). A forward runs the module on this rank's rows, all-gathers the outputs so that
every rank holds the whole batch's output, and routes the parameters through one autograd node
whose backward sums their gradients over the ranks in one bucketed all-reduce. Every rank then
computes the same loss, and ``loss.backward()`` leaves the full-batch gradient in ``.grad`` on
every rank, so ``torch.optim`` steps identically everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from fdp import _tree
from fdp._buffers import exchange_buffers
from fdp.backends._comm import Communicator
from fdp.backends._frame import AxisFrame, bind_axis
from fdp.backends._module import ModuleCall, ModuleResult, replica_forward

__all__ = ["run_module"]


class _SumGradsOverRanks(torch.autograd.Function):
    """Identity on the parameters; backward all-reduces (sums) their gradients in buckets."""

    @staticmethod
    def forward(comm: Communicator, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.comm = inputs[0]
        ctx.like = [torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
                    for p in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        dense = [torch.zeros_like(z) if g is None else g
                 for g, z in zip(grads, ctx.like, strict=True)]
        return (None, *ctx.comm.all_reduce_many(dense, "sum"))


class _GatherRows(torch.autograd.Function):
    """All-gathers every rank's (padded) rows. Every rank computes the same loss from the
    result, so backward keeps this rank's slice of the cotangent without summing; ``anchor``
    (a parameter routed through :class:`_SumGradsOverRanks`) makes every rank's backward reach
    the gradient all-reduce, also on a rank whose rows did not reach the loss."""

    @staticmethod
    def forward(x: torch.Tensor, anchor: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return comm.all_gather(x.contiguous())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        _, anchor, ctx.comm = inputs
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        shape, dtype, device = ctx.anchor
        return g[ctx.comm.index()], torch.zeros(shape, dtype=dtype, device=device), None


def run_module(comm: Communicator, device: torch.device, call: ModuleCall) -> ModuleResult:
    """This rank's part of a ``DataParallel`` forward: the whole batch's output, and the
    buffers the policy keeps (the same on every rank)."""
    layout, dim = call.layout, call.dim
    rank, m = comm.index(), layout.max_size
    # Parameters, buffers that require grad and differentiable inputs get their gradients
    # summed over the ranks: each rank's backward only reaches its own rows' contributions.
    leaves, treedef = _tree.flatten((call.inputs, call.kwargs))
    summed = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    params = call.params
    tracked = [k for k, v in call.buffers.items() if v.requires_grad]
    routed = list(_SumGradsOverRanks.apply(
        comm, *params.values(), *(call.buffers[k] for k in tracked),
        *(leaves[i] for i in summed))) if params or summed or tracked else []
    used = dict(zip(params, routed[:len(params)], strict=True))
    buffers = {**call.buffers, **dict(zip(tracked, routed[len(params):len(params) + len(tracked)],
                                          strict=True))}
    for i, x in zip(summed, routed[len(params) + len(tracked):], strict=True):
        leaves[i] = x
    rows = layout.padded_index()[rank * m:(rank + 1) * m]
    local = _tree.unflatten([x.index_select(dim, rows.to(x.device))
                             if isinstance(x, torch.Tensor) else x for x in leaves], treedef)
    mask = (torch.arange(m) < layout.sizes[rank]).to(device)
    frame = AxisFrame(call.axis_name, comm.size, torch.tensor(rank, device=device),
                      comm=comm, mask=mask if call.synced else None,
                      offset=torch.tensor(layout.offsets[rank], device=device))
    count = None if call.synced else torch.tensor(layout.sizes[rank])  # trim to the real rows
    with bind_axis(frame):
        out, new_buffers, leaf_dims = replica_forward(call.apply, dim, m, call.axis_name)(
            used, buffers, count, local)
    dims = dict(zip((path for path, _ in _tree.leaves_with_path(out, "out")), leaf_dims.dims,
                    strict=True))
    anchor = routed[0] if routed else torch.zeros(())
    real = layout.real_index(device)

    def gather(path: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        every = _GatherRows.apply(x, anchor, comm)  # [N, ..., m at its batch dim + 1, ...]
        d = dims[path]
        assert d is not None  # a tensor leaf
        return every.movedim(0, d).flatten(d, d + 1).index_select(d, real.to(x.device))

    out = _tree.map_with_path(gather, out, root="out")
    kept = exchange_buffers(comm, {k: v.detach() for k, v in new_buffers.items()}, layout.sizes,
                            call.buffer_policy, "DataParallel")
    return ModuleResult(out, kept)
