"""Sharded optimizer state (ZeRO stage 1): each replica keeps and updates one slice.

``fdp.TrainState.create(..., mesh=mesh, shard_optimizer_state=True)`` builds the state and
``fdp.data_parallel_step(..., shard_optimizer_state=True)`` updates it. How a step runs:

1. the gradient comes from :func:`fdp.value_and_grad` as usual (reduced over the mesh);
2. every parameter (and its gradient) is flattened, padded with zeros to a multiple of the mesh
   size ``N`` and cut into ``N`` equal slices; replica ``r`` takes slice ``r`` of each;
3. in an :func:`fdp.pmap` over the mesh, each replica runs ``optimizer.update`` on its slices
   with its slice of the state; a transformation that needs a sum over *all* parameters
   (:func:`fdp.optim.clip_by_global_norm`'s norm) calls :func:`fdp.optim.sum_over_shards`,
   which is a ``psum`` over the mesh there;
4. the updated slices are all-gathered (on a mesh whose replicas this process holds, the
   stacked outputs of the pmap already are the gathered slices) and cut back to the shapes.

Slicing is per parameter, so a parameter without a gradient (``None``: frozen or unused) is
left out of the update as a whole, exactly as on one device: its slices, state and params stay
as they were. Zero padding is inert: a zero gradient on a zero parameter moves neither the
state nor the parameter of any fdp optimizer (with ``eps > 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fdp._collectives import all_gather, psum
from fdp._compat import pytree
from fdp._mesh import Mesh
from fdp._pmap import pmap
from fdp._tree import Params
from fdp.optim import apply_updates
from fdp.optim._base import summing_over_shards

__all__ = ["ShardedOptState", "init_sharded", "sharded_update"]


class ShardedOptState(NamedTuple):
    """An optimizer state split over the replicas of a mesh (``TrainState.opt_state``).

    Attributes:
        slices: the optimizer's own state (e.g. an :class:`fdp.optim.AdamState`) for the
            slices of the parameters, with one leading entry per replica this process holds
            (``mesh.backend.local_size``): all ``N`` on the vmap and threads meshes, stacked on
            the mesh's home device; one on a distributed mesh, whose processes each hold only
            their own slice. A parameter of ``n`` elements has slices of ``ceil(n / N)``
            elements (the last one zero-padded).
        mesh_size: ``N``, the number of replicas the state is split over.

    Example:
        >>> opt = fdp.optim.adam(1e-3)
        >>> state = fdp.TrainState.create({"w": torch.zeros(10)}, opt, mesh=fdp.Mesh(4),
        ...                               shard_optimizer_state=True)
        >>> state.opt_state.mesh_size, tuple(state.opt_state.slices.mu["w"].shape)
        (4, (4, 3))
    """

    slices: Any
    mesh_size: int


def _chunk(x: torch.Tensor, n: int) -> int:
    return max(1, math.ceil(x.numel() / n))


def _local_slices(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This process's slices of ``x``: ``(local_size, ceil(numel / N))``."""
    n = mesh.size
    chunk = _chunk(x, n)
    flat = x.detach().reshape(-1)
    if flat.numel() != n * chunk:
        flat = torch.nn.functional.pad(flat, (0, n * chunk - flat.numel()))
    return mesh.backend.local(flat.view(n, chunk))


def init_sharded(params: Params, optimizer: Any, mesh: Mesh) -> ShardedOptState:
    """``optimizer.init`` on each of this process's slices of ``params``, stacked."""
    slices = {k: _local_slices(v, mesh) for k, v in params.items()}
    states = [optimizer.init({k: s[j].clone() for k, s in slices.items()})
              for j in range(mesh.backend.local_size)]
    leaves0, spec = pytree.tree_flatten(states[0])
    columns = zip(*(pytree.tree_flatten(s)[0] for s in states), strict=True)
    stacked = [torch.stack(list(col)) if isinstance(first, torch.Tensor) else first
               for first, col in zip(leaves0, columns, strict=True)]
    return ShardedOptState(pytree.tree_unflatten(stacked, spec), mesh.size)


def check_sharded(opt_state: Any, mesh: Mesh, fn: str) -> ShardedOptState:
    """``opt_state`` as a :class:`ShardedOptState` for ``mesh``, or a clear error."""
    if not isinstance(opt_state, ShardedOptState):
        raise TypeError(f"{fn}: shard_optimizer_state=True needs a sharded optimizer state, but "
                        f"state.opt_state is a {type(opt_state).__name__}; build the state with "
                        f"fdp.TrainState.create(params, optimizer, mesh=mesh, "
                        f"shard_optimizer_state=True)")
    if opt_state.mesh_size != mesh.size:
        raise ValueError(f"{fn}: state.opt_state is split over {opt_state.mesh_size} replicas "
                         f"but the mesh has {mesh.size}; build the state for this mesh with "
                         f"fdp.TrainState.create(..., mesh=mesh, shard_optimizer_state=True)")
    return opt_state


def sharded_update(optimizer: Any, mesh: Mesh, grads: Params, opt_state: ShardedOptState,
                   params: Params) -> tuple[Params, ShardedOptState]:
    """One optimizer update on sliced state: ``(new_params, new_opt_state)``."""
    n, name = mesh.size, mesh.axis_name
    gather = mesh.backend.local_size < n  # else this process holds every replica's slices
    live = [k for k in params if grads.get(k) is not None]
    g_slices = {k: None if grads.get(k) is None else _local_slices(grads[k], mesh)
                for k in params}
    p_slices = {k: _local_slices(v, mesh) for k, v in params.items()}
    groups = _dtype_groups(live, params)

    def body(g: Params, p: Params, state: Any) -> tuple[list[torch.Tensor], Any]:
        with summing_over_shards(_psum_over(name)):
            updates, new_state = optimizer.update(g, state, p)
        new_p = apply_updates(p, updates)
        flats = [torch.cat([new_p[k] for k in keys]) for keys in groups.values()]
        if gather:
            flats = [all_gather(x, name) for x in flats]
        return flats, new_state

    flats, new_slices = pmap(body, mesh)(g_slices, p_slices, opt_state.slices)
    new_params = dict(params)
    for keys, flat in zip(groups.values(), flats, strict=True):
        gathered = flat[0] if gather else flat  # (N, sum of the group's chunks)
        offset = 0
        for k in keys:
            chunk = _chunk(params[k], n)
            whole = gathered[:, offset:offset + chunk].reshape(-1)[:params[k].numel()]
            new_params[k] = whole.reshape(params[k].shape).to(params[k].device)
            offset += chunk
    return new_params, ShardedOptState(new_slices, n)


def _psum_over(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def total(x: torch.Tensor) -> torch.Tensor:
        return psum(x, name)

    return total


def _dtype_groups(keys: list[str], params: Params) -> dict[torch.dtype, list[str]]:
    """The keys by dtype: one concatenated all-gather per dtype."""
    groups: dict[torch.dtype, list[str]] = {}
    for k in keys:
        groups.setdefault(params[k].dtype, []).append(k)
    return groups
