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

from types import SimpleNamespace
from typing import Any

import torch

from fdp import _tree
from fdp._collectives import AxisFrame, bind_axis
from fdp._layout import Layout
from fdp.backends._spmd import _reduce_buffers

Tensors = dict[str, torch.Tensor]


class _SumGradsOverRanks(torch.autograd.Function):
    """Identity on the parameters; backward all-reduces (sums) their gradients in buckets."""

    @staticmethod
    def forward(comm: Any, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.comm = inputs[0]
        ctx.like = [torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
                    for p in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, ctx.like,
                                                                         strict=True)]
        return (None, *ctx.comm.all_reduce_many(grads, "sum"))


class _GatherRows(torch.autograd.Function):
    """All-gathers every rank's (padded) rows. Every rank computes the same loss from the
    result, so backward keeps this rank's slice of the cotangent without summing; ``anchor``
    (a parameter routed through :class:`_SumGradsOverRanks`) makes every rank's backward reach
    the gradient all-reduce, also on a rank whose rows did not reach the loss."""

    @staticmethod
    def forward(x: torch.Tensor, anchor: torch.Tensor, comm: Any) -> torch.Tensor:
        return comm.all_gather(x.contiguous())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        _, anchor, ctx.comm = inputs
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        shape, dtype, device = ctx.anchor
        return g[ctx.comm.index()], torch.zeros(shape, dtype=dtype, device=device), None


def forward(dp: Any, mesh: Any, model: Any, params: Tensors, buffers: Tensors, batch: tuple,
            layout: Layout, synced: bool, run_replica: Any) -> tuple[Any, Tensors]:
    """This rank's part of ``DataParallel.forward``: ``(global output, kept buffers)``."""
    from fdp._data_parallel import _check_rows

    comm = mesh.impl.comm()
    rank, m = comm.index(), layout.max_size
    # Parameters and differentiable inputs get their gradients summed over the ranks: each
    # rank's backward only reaches its own rows' contributions.
    leaves, treedef = _tree.flatten(batch)
    summed = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    routed = list(_SumGradsOverRanks.apply(comm, *params.values(), *(leaves[i] for i in summed))) \
        if params or summed else []
    used = dict(zip(params, routed[:len(params)], strict=True))
    for i, x in zip(summed, routed[len(params):], strict=True):
        leaves[i] = x
    rows = layout.padded_index()[rank * m:(rank + 1) * m]
    local = _tree.unflatten([x.index_select(dp.dim, rows.to(x.device))
                             if isinstance(x, torch.Tensor) else x for x in leaves], treedef)
    mask = (torch.arange(m) < layout.sizes[rank]).to(mesh.devices[0])
    frame = AxisFrame(mesh.axis_name, mesh.size, torch.tensor(rank, device=mask.device),
                      comm=comm, mask=mask if synced else None,
                      offset=torch.tensor(layout.offsets[rank], device=mask.device))
    count = None if synced else torch.tensor(layout.sizes[rank])  # trim to the real rows
    with bind_axis(frame):
        out, new_buffers = run_replica(model.apply, dp.dim, m)(used, dict(buffers), count,
                                                               local)
    for path, x in _tree.leaves_with_path(out, "out"):  # every rank, before any collective
        if isinstance(x, torch.Tensor):
            _check_rows(path, tuple(x.shape), m, dp.dim)
    anchor = routed[0] if routed else torch.zeros(())
    real = layout.real_index(mask.device)

    def gather(_: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        every = _GatherRows.apply(x, anchor, comm)  # [N, ..., m at dim + 1, ...]
        d = dp.dim % x.dim()
        return every.movedim(0, d).flatten(d, d + 1).index_select(d, real.to(x.device))

    out = _tree.map_with_path(gather, out, root="out")
    if not buffers:
        return out, {}
    plan = SimpleNamespace(layout=layout, buffer_policy=dp.buffer_policy)
    return out, _reduce_buffers(comm, new_buffers, plan)
