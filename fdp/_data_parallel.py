"""``fdp.DataParallel``: ``nn.DataParallel``'s interface, built on fdp's pure primitives.

A forward is ``replicate`` (buffers) → ``scatter`` (every tensor argument) → ``pmap`` of
``functionalize(module).apply`` → ``gather`` (each output along its own batch dim), and then the
kept buffers are written back into the wrapped module. The parameters that enter the pmap are
the module's own, shared by the replicas (``in_axes=None``; each replica moves them to its
device), so ``loss.backward()`` fills their ``.grad`` (sparse ones too) and ``torch.optim``
works unchanged. A backend whose autograd that composition cannot express runs the forward
itself (:meth:`fdp.backends.Backend.run_module`: the distributed backend).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fdp import _check, _explain, _tree
from fdp._buffers import reduce_buffers
from fdp._compat import BatchNormBase
from fdp._data_parallel_checks import (
    _FN,
    Tensors,
    _batch_size,
    _check_devices,
    _check_options,
    _default_mesh,
    _module_device,
)
from fdp._functionalize import Model, check_initialized, functionalize
from fdp._layout import Layout, Sharded, split_sizes
from fdp._mesh import Mesh
from fdp._pmap import pmap
from fdp._primitives import gather, replicate, scatter
from fdp.backends._base import ModuleCall, ModuleResult
from fdp.backends._comm import Unreachable
from fdp.backends._frame import bind_axis, lookup
from fdp.backends._module import batch_dims, narrow, replica_forward
from fdp.backends._options import BufferPolicy, Randomness, SplitRule
from fdp.nn import SyncBatchNorm

__all__ = ["DataParallel"]


class DataParallel(nn.Module):
    """``torch.nn.DataParallel`` as a thin shell over fdp's pure primitives.

    The wrapped module is registered as ``self.module`` (so ``state_dict`` keys carry
    ``nn.DataParallel``'s ``module.`` prefix) and the forward takes the module's arguments.
    Every tensor in the positional and keyword arguments (nested in tuples, lists and dicts
    too) is split along ``dim``, as ``nn.DataParallel`` does; other values reach every replica
    as they are. Outputs (tensors, or tuples/lists/dicts of them) are gathered along ``dim``
    in the original row order. The module's parameters enter the computation as they are, so
    ``loss.backward()`` leaves in their ``.grad`` the single-device gradient of the whole
    batch, uneven splits included, and any ``torch.optim`` optimizer works unchanged.

    Each replica runs the module on exactly its own rows, as ``nn.DataParallel`` does: on the
    vmap backend replicas with the same row count form one vmapped group; on the threads
    backend each replica thread trims its shard. So a layer that mixes the rows of its batch
    (BatchNorm in training mode) sees what it would see in ``nn.DataParallel``. Replicas that
    receive no rows contribute nothing (on the vmap backend they do not run). A model with
    :class:`fdp.nn.SyncBatchNorm` layers runs as one pmap over padded shards instead: those
    layers leave the padding rows out themselves.

    Args:
        module: the model.
        mesh: where the replicas run. Default: one replica per visible CUDA device
            (``fdp.Mesh(devices=["cuda:0", ...])``, threads backend) when the module is on a
            GPU and there are several, else ``fdp.Mesh(1)`` on the module's device: the
            module itself, as ``nn.DataParallel`` without GPUs. On a distributed mesh
            (``fdp.Mesh.distributed()``) every rank calls the wrapper with the same global
            batch; each runs its rows, every rank gets the whole output, and ``.backward()``
            sums the parameter gradients over the ranks (docs/migration.md).
        dim: the batch dimension of every tensor argument and output.
        split: how rows are split: ``"chunk"`` (``torch.chunk``'s rule, ``nn.DataParallel``'s),
            ``"even"`` (sizes differ by at most one) or a list of row counts per replica.
        buffer_policy: which replica's updated buffers (BatchNorm running statistics) are
            written back into the module: ``"replica0"`` (``nn.DataParallel``'s: the first
            replica's), ``"mean"`` (weighted by row counts) or ``"sync"`` (layers converted with
            :func:`fdp.nn.convert_sync_batchnorm`; then statistics span the whole batch and
            equal single-device training).
        randomness: random ops such as dropout: ``"different"`` (default: each replica draws
            its own values, as the GPUs of ``nn.DataParallel`` do), ``"same"`` or ``"error"``.
            Draws come from torch's global generator (``torch.manual_seed`` reproduces them).
        output_device: where outputs are returned. Default: the mesh's first device.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> dp = fdp.DataParallel(net, fdp.Mesh(2))
        >>> out = dp(torch.randn(5, 3))                  # rows 3 + 2, one replica each
        >>> out.shape, list(dp.state_dict())[0], int(net[1].num_batches_tracked)
        (torch.Size([5, 4]), 'module.0.weight', 1)
        >>> out.square().mean().backward()               # fills net's .grad
        >>> net[0].weight.grad.shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        module: nn.Module,
        mesh: Mesh | None = None,
        *,
        dim: int = 0,
        split: SplitRule = "chunk",
        buffer_policy: BufferPolicy = "replica0",
        randomness: Randomness = "different",
        output_device: torch.device | str | int | None = None,
    ) -> None:
        super().__init__()
        _check_options(module, mesh, dim, split, buffer_policy, randomness)
        self.module = module
        self.dim = dim
        self.split = split
        self.buffer_policy = buffer_policy
        self.randomness = randomness
        self.output_device = (None if output_device is None
                              else _check.device(output_device, _FN, "output_device"))
        self._mesh = mesh
        self._meshes: dict[Any, Mesh] = {}  # default meshes by device, vmap groups by size
        self._functional: tuple[tuple, Model] | None = None

    @property
    def mesh(self) -> Mesh:
        """The mesh the next forward runs on (the default follows the module's device)."""
        if self._mesh is not None:
            return self._mesh
        device = _module_device(self.module)
        if device not in self._meshes:
            self._meshes[device] = _default_mesh(device)
        return self._meshes[device]

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Runs the module data-parallel on ``inputs``/``kwargs``; see the class docstring."""
        if not _has_tensor((inputs, kwargs)):  # nothing to split: the module itself runs it,
            return self._to_output_device(self.module(*inputs, **kwargs))  # as nn.DataParallel
        check_initialized(self.module, _FN)
        mesh = self.mesh
        params: Tensors = dict(self.module.named_parameters())
        # buffers that require grad keep their autograd link, as nn.DataParallel's broadcast
        buffers = {k: v if v.requires_grad else v.detach()
                   for k, v in self.module.named_buffers()}
        _check_devices({**params, **buffers}, mesh)
        layout = Layout(split_sizes(_batch_size((inputs, kwargs), self.dim), mesh.size,
                                    self.split, _FN), self.dim)
        call = ModuleCall(self._model().apply, params, buffers, inputs, kwargs, layout,
                          self.dim, _sync_layers(self.module, self.buffer_policy),
                          self.buffer_policy, self.randomness, mesh.axis_name)
        try:
            result = mesh.backend.run_module(call) or self._compose(mesh, call)
        except (RuntimeError, ValueError) as e:
            if (better := _explain.in_module(e, layout, params, _tensors(inputs, kwargs))) \
                    is None:
                raise
            raise better from e
        self._store(result.buffers)
        return self._to_output_device(result.output)

    def _to_output_device(self, out: Any) -> Any:
        if self.output_device is None:
            return out
        device = self.output_device
        return _tree.map_tensors(lambda x: x.to(device), out)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the caches: the functional model is rebuilt on the next call."""
        return {**super().__getstate__(), "_functional": None, "_meshes": {}}

    def __deepcopy__(self, memo: dict[int, Any]) -> DataParallel:
        """A copy of the module that shares the mesh (a mesh owns threads or a process group)."""
        if self._mesh is not None:
            memo[id(self._mesh)] = self._mesh
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def extra_repr(self) -> str:
        mesh = "default" if self._mesh is None else repr(self._mesh)
        return (f"mesh={mesh}, dim={self.dim}, split={self.split!r}, "
                f"buffer_policy={self.buffer_policy!r}, randomness={self.randomness!r}")

    # --- internals ------------------------------------------------------------------------

    def _model(self) -> Model:
        """``functionalize(self.module)``, redone when the module's structure or modes change.

        The threads backend runs replicas on copies of the module's structure, which keep the
        train/eval flags they were made with; a new functional model picks up ``.eval()``.
        """
        key = (tuple((name, type(m), m.training) for name, m in self.module.named_modules()),
               tuple((k, v.shape) for k, v in self.module.named_parameters()),
               tuple((k, v.shape) for k, v in self.module.named_buffers()))
        if self._functional is None or self._functional[0] != key:
            self._functional = (key, functionalize(self.module))
        return self._functional[1]

    def _compose(self, mesh: Mesh, call: ModuleCall) -> ModuleResult:
        """The forward from fdp's primitives: ``scatter``, ``pmap``, ``gather``."""
        layout = call.layout
        if layout.even or call.synced:  # SyncBatchNorm leaves padding rows out by itself
            out, stacked = self._run_mesh(mesh, call, trim=False)
        elif mesh.backend.ragged:  # each replica trims its shard to its own rows
            out, stacked = self._run_mesh(mesh, call, trim=True)
        else:  # one vmap per run of replicas with equal rows
            out, stacked = self._run_groups(mesh, call)
        counts = [s for s in layout.sizes if s > 0]
        return ModuleResult(out, reduce_buffers(stacked, counts, call.buffer_policy, _FN))

    def _run_mesh(self, mesh: Mesh, call: ModuleCall, trim: bool) -> tuple[Any, Tensors]:
        """One pmap over the whole mesh; with ``trim`` each replica thread drops its padding."""
        layout = call.layout
        sharded = scatter((call.inputs, call.kwargs), mesh, self.dim, list(layout.sizes))
        counts = sharded.counts if trim else None
        # parameters are shared (each replica moves them to its device), not replicated: a
        # batched weight would make every matmul a batched one (about 4x slower for an MLP on
        # the vmap backend), and sparse gradients cannot flow back through a replica select
        mapped = pmap(replica_forward(call.apply, self.dim, layout.max_size, mesh.axis_name), mesh,
                      in_axes=(None, 0, None if counts is None else 0, 0),
                      randomness=call.randomness)
        res = mapped(call.params, replicate(call.buffers, mesh), counts, sharded)
        out, new_buffers, static = res.data
        dims = static.dims
        keep = [i for i, s in enumerate(layout.sizes) if s > 0]
        return (_gather_outputs(out, dims, layout, mesh),
                {k: v[keep] if len(keep) < mesh.size else v for k, v in new_buffers.items()})

    def _run_groups(self, mesh: Mesh, call: ModuleCall) -> tuple[Any, Tensors]:
        """Replicas that cannot run ragged shards: one pmap per run of replicas with equal
        row counts."""
        layout = call.layout
        runs, stacked = [], []
        for first_row, k, rows in layout.groups():
            key = ("group", k, mesh)
            if key not in self._meshes:  # kept: a mesh's general executor owns threads
                self._meshes[key] = Mesh.from_backend(mesh.backend.subgroup(k), mesh.axis_name)
            group = self._meshes[key]
            first = next(i for i, (off, s) in enumerate(zip(layout.offsets, layout.sizes,
                                                            strict=True))
                         if off == first_row and s > 0)
            fn = _no_collectives(replica_forward(call.apply, self.dim, rows, mesh.axis_name),
                                 mesh, first, layout)
            part = scatter(narrow((call.inputs, call.kwargs), self.dim, first_row, k * rows),
                           group, self.dim)
            res = pmap(fn, group, in_axes=(None, 0, None, 0), randomness=call.randomness)(
                call.params, replicate(call.buffers, group), None, part)
            out, new_buffers, _ = res.data
            runs.append((out, rows, res.layout, group))
            stacked.append(new_buffers)
        # groups of different sizes tell each output's batch dim where one alone cannot
        dims = _common_dims([_output_dims(out, rows, self.dim) for out, rows, _, _ in runs],
                            [p for p, _ in _tree.leaves_with_path(runs[0][0], "out")],
                            self.dim)
        outs = [_gather_outputs(out, dims, lay, group) for out, _, lay, group in runs]
        return (_cat_outputs(outs, dims),
                {k: torch.cat([s[k] for s in stacked]) for k in call.buffers})

    def _store(self, kept: Tensors) -> None:
        live = dict(self.module.named_buffers())
        with torch.no_grad():
            for key, value in kept.items():
                if not torch.equal(live[key], value):
                    live[key].copy_(value)


def _sync_layers(module: nn.Module, policy: BufferPolicy) -> bool:
    """Whether ``module`` has fdp.nn.SyncBatchNorm layers; with ``policy="sync"``, checks that
    no other BatchNorm would keep per-replica statistics."""
    for name, m in module.named_modules(prefix="module"):
        if policy == "sync" and isinstance(m, BatchNormBase) and not isinstance(m, SyncBatchNorm) \
                and m.training and m.track_running_stats:
            raise ValueError(
                f"{_FN}: buffer_policy='sync' but {name} is a {type(m).__name__}, whose "
                f"statistics are per replica; wrap fdp.nn.convert_sync_batchnorm(module) "
                f"instead, or use buffer_policy='replica0' or 'mean'"
            )
    return any(isinstance(m, SyncBatchNorm) for m in module.modules())


def _has_tensor(call: tuple[tuple[Any, ...], dict[str, Any]]) -> bool:
    """Whether the call has a tensor to split (array-likes get an error that says convert)."""
    inputs, kwargs = call
    leaves = _tree.flatten(call)[0]
    for path, leaf in [*_tree.leaves_with_path(inputs, "inputs"),
                       *_tree.leaves_with_path(kwargs, "kwargs")]:
        if hasattr(leaf, "__array__") and not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{_FN}: {path} is a {type(leaf).__name__}, not a torch.Tensor; "
                            f"convert it with torch.as_tensor to split it")
    return any(isinstance(x, torch.Tensor) for x in leaves)


def _tensors(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return [(p, x) for p, x in [*_tree.leaves_with_path(inputs, "inputs"),
                                *_tree.leaves_with_path(kwargs, "kwargs")]
            if isinstance(x, torch.Tensor)]


def _output_dims(out: Any, rows: int, dim: int) -> list[list[int] | None]:
    """Per output leaf, the dims that could be its batch dim (``None``: not a tensor)."""
    return [batch_dims(path, tuple(x.shape[1:]), rows, dim) if isinstance(x, torch.Tensor)
            else None for path, x in _tree.leaves_with_path(out, "out")]


def _common_dims(candidates: list[list[Any]], paths: list[str], dim: int
                 ) -> list[int | None]:
    """Per leaf, the batch dim every group agrees on (``dim`` first when several remain)."""
    out: list[int | None] = []
    for leaf, per_group in zip(paths, zip(*candidates, strict=True), strict=True):
        if per_group[0] is None:
            out.append(None)
            continue
        agreed = [d for d in per_group[0] if all(d in c for c in per_group[1:])]
        if not agreed:
            raise ValueError(f"{_FN}: the module's output {leaf} has no dim that holds every "
                             f"replica's rows (dim={dim}); return per-example outputs with the "
                             f"batch at one dim, to be gathered along it")
        out.append(agreed[0])
    return out


def _gather_outputs(out: Any, dims: list[int | None], layout: Layout, mesh: Mesh) -> Any:
    """Every output leaf gathered along its own batch dim, padding dropped."""
    leaves, treedef = _tree.flatten(out)
    return _tree.unflatten([x if d is None else gather(Sharded(x, layout), mesh, dim=d)
                            for x, d in zip(leaves, dims, strict=True)], treedef)


def _cat_outputs(parts: list[Any], dims: list[int | None]) -> Any:
    """The groups' gathered outputs concatenated leaf by leaf along each leaf's batch dim."""
    if len(parts) == 1:
        return parts[0]
    flats = [_tree.flatten(p)[0] for p in parts]
    leaves = [col[0] if d is None else torch.cat(col, d)
              for col, d in zip(zip(*flats, strict=True), dims, strict=True)]
    return _tree.unflatten(leaves, _tree.flatten(parts[0])[1])


def _no_collectives(fn: Callable[..., Any], mesh: Mesh, first: int,
                    layout: Layout) -> Callable[..., Any]:
    """Runs ``fn`` with the group's axis rebound to the replicas that run (those with rows: as
    in ``fdp.value_and_grad``), where any collective raises (a group cannot reach the others)."""
    position = layout.active_position(layout.offsets[first])
    unreachable = Unreachable(layout.active_count, (
        f"{_FN}: the module calls a collective, but on a vmap mesh an uneven split "
        f"({layout.sizes} rows) runs replicas with different row counts apart. Use a batch "
        f"size divisible by the mesh size, a threads mesh, or fdp.nn.SyncBatchNorm (which "
        f"handles uneven splits)"))

    def run(*args: Any) -> Any:
        frame = lookup(mesh.axis_name, _FN)
        shadow = dataclasses.replace(frame, size=layout.active_count,
                                     index=frame.index + position, comm=unreachable)
        offset = getattr(frame, "offset", None)  # row offsets: of the whole batch, not the group
        if offset is not None:
            shadow = dataclasses.replace(shadow, offset=offset + layout.offsets[first])
        with bind_axis(shadow):
            return fn(*args)

    return run
