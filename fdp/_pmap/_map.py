"""``fdp.pmap``: run one function per replica with named-axis collectives inside."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fdp import _check, _explain, _inputs, _tree
from fdp._layout import Layout, Sharded
from fdp._mesh import Mesh, check_mesh
from fdp._pmap._outputs import agreed_outputs, place, replicated_number
from fdp._pmap._static import Static, is_sharded, static_argnums, static_positions, unwrapping
from fdp.backends._base import Replica
from fdp.backends._frame import AxisFrame, bind_axis
from fdp.backends._options import Randomness, check_randomness

__all__ = ["pmap"]

Axes = Any  # int | None | a tree prefix of them


def pmap(
    fn: Callable[..., Any],
    mesh: Mesh,
    in_axes: Axes = 0,
    out_axes: Axes = 0,
    axis_name: str | None = None,
    static_broadcasted_argnums: int | Sequence[int] = (),
    randomness: Randomness = "error",
) -> Callable[..., Any]:
    """Maps ``fn`` over the replicas of ``mesh``; collectives inside it see ``axis_name``.

    Args:
        fn: the per-replica function. Inside it, :func:`fdp.psum` and friends reduce over the
            replicas by ``axis_name``.
        mesh: the mesh whose replicas run ``fn``.
        in_axes: per positional argument (a tree prefix, as in ``jax.pmap``): the axis of each
            tensor that holds the replicas (size ``mesh.size``), or ``None`` for a value every
            replica shares. :class:`fdp.Sharded` arguments (from :func:`fdp.scatter`) are always
            mapped over their replica axis. Non-tensor leaves and keyword arguments are
            broadcast.
        out_axes: per output (a tree prefix): where the replica axis goes, or ``None`` for a
            value that is the same on every replica (checked: differing values are an error).
        axis_name: the name collectives use; defaults to ``mesh.axis_name``.
        static_broadcasted_argnums: positions of positional arguments passed to every replica
            as they are: not mapped, not traced, not checked (as in ``jax.pmap``; fdp does not
            cache compilations, so they need not be hashable). Negative positions count from
            the end of each call's positional arguments. A tuple ``in_axes`` still has one
            entry per positional argument; the entries at static positions are ignored.
        randomness: random ops (dropout) inside ``fn``, as ``torch.func.vmap``'s modes:
            ``"error"`` (default: they raise), ``"different"`` (each replica draws its own
            values) or ``"same"`` (every replica draws the same values). Draws come from
            torch's global generator, so ``torch.manual_seed`` makes a run reproducible.

    Returns:
        A function with ``fn``'s arguments. Outputs have the replica axis at ``out_axes``. When
        arguments were :class:`fdp.Sharded` and ``out_axes=0``, the output is ``Sharded`` with
        their layout, so :func:`fdp.gather` can drop padding rows.

    Example:
        >>> mesh = fdp.Mesh(4)
        >>> f = fdp.pmap(lambda x: x - fdp.pmean(x, "dp"), mesh)
        >>> f(torch.tensor([1.0, 2.0, 3.0, 6.0]))
        tensor([-2., -1.,  0.,  3.])

        A static argument (here a Python callable) reaches every replica unchanged:

        >>> g = fdp.pmap(lambda act, x: act(x), mesh, static_broadcasted_argnums=0)
        >>> g(torch.relu, torch.tensor([-1.0, 2.0, -3.0, 4.0]))
        tensor([0., 2., 0., 4.])
    """
    _check.callable_(fn, "pmap", "fn")
    check_mesh(mesh, "pmap")
    name = mesh.axis_name if axis_name is None else axis_name
    if not isinstance(name, str) or not name:
        raise TypeError(f"pmap: axis_name must be a non-empty str, got {axis_name!r}")
    _check_axes_spec(in_axes, "in_axes")
    _check_axes_spec(out_axes, "out_axes")
    static = static_argnums(static_broadcasted_argnums, fn)
    check_randomness(randomness, "pmap")

    @functools.wraps(fn)
    def mapped(*args: Any, **kwargs: Any) -> Any:
        if not static:
            return _call(fn, mesh, name, in_axes, out_axes, args, kwargs, randomness)
        fixed = static_positions(static, len(args), args)
        axes = in_axes
        if isinstance(in_axes, (tuple, list)):
            if len(in_axes) != len(args):
                raise ValueError(
                    f"pmap: in_axes has {len(in_axes)} entries but the function got "
                    f"{len(args)} positional arguments; with static_broadcasted_argnums, "
                    f"in_axes still has one entry per positional argument (static ones are "
                    f"ignored), as in jax.pmap"
                )
            axes = tuple(None if i in fixed else a for i, a in enumerate(in_axes))
        wrapped = tuple(Static(a) if i in fixed else a for i, a in enumerate(args))
        return _call(unwrapping(fn), mesh, name, axes, out_axes, wrapped, kwargs, randomness)

    return mapped


def _call(fn: Callable[..., Any], mesh: Mesh, name: str, in_axes: Axes, out_axes: Axes,
          args: tuple[Any, ...], kwargs: dict[str, Any], randomness: Randomness) -> Any:
    pairs = _tree.leaves_with_path(args, "args", is_leaf=is_sharded)
    treedef = _tree.flatten(args, is_leaf=is_sharded)[1]
    axes = _leaf_axes(in_axes, args)
    layouts: list[Layout] = []
    flat: list[Any] = []
    flat_axes: list[int | None] = []
    paths: list[str] = []
    for (path, leaf), axis in zip(pairs, axes, strict=True):
        if is_sharded(leaf):
            if axis != 0:
                raise ValueError(f"pmap: {path} is Sharded (split over replicas) but its "
                                 f"in_axes is {axis}; a Sharded is mapped over its replica "
                                 f"axis: use in_axes=0 for it")
            layouts.append(leaf.layout)
            inner = _tree.leaves_with_path(leaf.data, path + ".data")
            flat.append(_Node(_tree.flatten(leaf.data)[1], len(inner)))
            flat_axes.append(None)
            paths.append(path)
            for inner_path, x in inner:
                flat.append(x)
                flat_axes.append(0 if isinstance(x, torch.Tensor) else None)
                paths.append(inner_path)
        else:
            flat.append(leaf)
            flat_axes.append(axis)
            paths.append(path)
    if len(set(layouts)) > 1:
        raise ValueError("pmap: Sharded arguments have different layouts; scatter them "
                         "together as one tree so that they split the same way")
    _check_mapped_inputs(flat, flat_axes, paths, mesh)
    return _run(fn, mesh, name, out_axes, treedef, flat, flat_axes, kwargs, layouts,
                randomness)


class _Node:
    """Marks where a Sharded argument's data leaves start in the flat argument list."""

    def __init__(self, treedef: Any, count: int) -> None:
        self.treedef, self.count = treedef, count


def _check_axes_spec(spec: Any, what: str) -> None:
    for path, leaf in _tree.leaves_with_path(spec, what):
        if leaf is not None and not _check.is_int(leaf):
            raise TypeError(
                f"pmap: {path} must be an int or None, got {type(leaf).__name__} ({leaf!r})"
            )


def _leaf_axes(in_axes: Axes, args: tuple) -> list[Any]:
    prefix = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    if isinstance(prefix, tuple) and len(prefix) != len(args):
        raise ValueError(
            f"pmap: in_axes has {len(prefix)} entries but the function got {len(args)} "
            f"positional arguments; give one entry per argument"
        )
    return _tree.broadcast_prefix(_align_prefix(prefix, args, "in_axes"), args, "in_axes")


def _align_prefix(prefix: Axes, tree: Any, what: str, of: str = "arguments") -> Axes:
    """Puts the dicts of an axes prefix in the key order of the matching dicts of ``tree``.

    JAX matches dict prefixes by key (it sorts keys); torch's pytree matches children by
    position, so ``{"b": None, "a": 0}`` would silently apply to ``{"a": ..., "b": ...}``
    the wrong way round. Matching by key here keeps the JAX meaning.
    """
    return _align(prefix, tree, what, (prefix, what, of))


def _align(p: Axes, t: Any, path: str, whole: tuple[Axes, str, str]) -> Axes:
    # a module-level recursion: a nested closure would leave a reference cycle per call
    if isinstance(p, dict) and isinstance(t, dict):
        if p.keys() != t.keys():
            prefix, what, of = whole
            raise ValueError(
                f"pmap: {what}={prefix!r} does not match the structure of the {of}: "
                f"{path} has keys {list(p)} but the value there has keys {list(t)}; give "
                f"one entry per key, or one int/None for the whole dict"
            )
        items = [(k, _align(p[k], t[k], f"{path}[{k!r}]", whole)) for k in t]
        return OrderedDict(items) if isinstance(p, OrderedDict) else dict(items)
    if isinstance(p, (tuple, list)) and isinstance(t, (tuple, list)) and len(p) == len(t):
        aligned = [_align(a, b, f"{path}[{i}]", whole)
                   for i, (a, b) in enumerate(zip(p, t, strict=True))]
        return type(p)(*aligned) if hasattr(p, "_fields") else type(p)(aligned)
    return p


def _check_mapped_inputs(flat: list, axes: list, paths: list, mesh: Mesh) -> None:
    tensors = [(p, x) for p, x in zip(paths, flat, strict=True) if isinstance(x, torch.Tensor)]
    _inputs.on_device(tensors, mesh, "pmap")
    for leaf, axis, path in zip(flat, axes, paths, strict=True):
        if axis is None or not isinstance(leaf, torch.Tensor):
            continue
        if not -leaf.dim() <= axis < leaf.dim():
            raise ValueError(
                f"pmap: in_axes={axis} is out of range for {path} with shape "
                f"{tuple(leaf.shape)}; use in_axes=None for values every replica shares"
            )
        local = mesh.backend.local_size  # the replicas this process holds
        if leaf.shape[axis] != local:
            raise ValueError(
                f"pmap: {path} has size {leaf.shape[axis]} at in_axes={axis} but the mesh has "
                f"{local} replicas{'' if local == mesh.size else ' in this process'}; build it "
                f"with fdp.replicate/fdp.scatter, or pass "
                f"in_axes=None for a value every replica shares"
            )


def _run(fn: Callable[..., Any], mesh: Mesh, name: str, out_axes: Axes, treedef: Any,
         flat: list[Any], flat_axes: list[int | None], kwargs: dict[str, Any],
         layouts: list[Layout], randomness: Randomness) -> Any:
    mapped_pos = [i for i, (x, a) in enumerate(zip(flat, flat_axes, strict=True))
                  if a is not None and isinstance(x, torch.Tensor)]
    in_dims = [flat_axes[i] % flat[i].dim() for i in mapped_pos]
    mapped = [flat[i] for i in mapped_pos]
    n_mapped = len(mapped)
    if layouts:  # the row offsets (and the mask of a padded split) ride along as mapped inputs
        offsets = torch.tensor(layouts[0].offsets, device=mesh.backend.home)
        mapped.append(mesh.backend.local(offsets))
        in_dims.append(0)
    padded = bool(layouts) and not layouts[0].even
    if padded:
        mapped.append(mesh.backend.local(layouts[0].mask(mesh.backend.home)))
        in_dims.append(0)
    out_info: dict[str, Any] = {}

    def body(replica: Replica, *tensors: torch.Tensor) -> list[torch.Tensor]:
        extra = tensors[n_mapped:]
        offset = extra[0] if layouts else None
        mask = extra[1] if padded else None
        values = list(flat)
        for i, t in zip(mapped_pos, tensors[:n_mapped], strict=True):
            values[i] = t
        args = rebuild_args(values, treedef)
        frame = AxisFrame(name, mesh.size, replica.index, comm=replica.comm, mask=mask,
                          offset=offset, tape=replica.tape)
        with bind_axis(frame):
            out = fn(*args, **kwargs)
        out_leaves, out_def = _tree.flatten(out)
        # Only whether each leaf is a tensor, and the static leaves, outlive the vmap. (On the
        # threads backend every replica reports its own, checked to agree below.)
        static = [(True, None) if isinstance(x, torch.Tensor) else (False, x)
                  for x in out_leaves]
        out_info.setdefault("calls", []).append((replica.index, out_def, static))
        return [x for x in out_leaves if isinstance(x, torch.Tensor)]

    try:
        results = iter(mesh.backend.map(body, mapped, in_dims, randomness=randomness))
    except RuntimeError as e:
        if (better := _explain.in_pmap(e)) is None:
            raise
        raise better from e
    out_def, static = agreed_outputs(out_info["calls"])
    home, replicas = mesh.backend.home, mesh.backend.local_size
    leaves = [next(results) if is_tensor else replicated_number(x, replicas, home)
              for is_tensor, x in static]
    outputs = _tree.unflatten(leaves, out_def)
    axes = _tree.broadcast_prefix(_align_prefix(out_axes, outputs, "out_axes", "outputs"), outputs,
                                  "out_axes", "outputs")
    paths = [p for p, _ in _tree.leaves_with_path(_tree.unflatten(leaves, out_def), "out")]
    placed = [place(x, a, p) for x, a, p in zip(leaves, axes, paths, strict=True)]
    out = _tree.unflatten(placed, out_def)
    if layouts and all(a == 0 for a in axes):
        return Sharded(out, layouts[0])
    return out


def rebuild_args(values: list, treedef: Any) -> tuple:
    leaves, i = [], 0
    while i < len(values):
        v = values[i]
        if isinstance(v, _Node):
            leaves.append(_tree.unflatten(values[i + 1 : i + 1 + v.count], v.treedef))
            i += 1 + v.count
        else:
            leaves.append(v)
            i += 1
    return _tree.unflatten(leaves, treedef)
