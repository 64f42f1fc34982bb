"""What the threads and distributed backends share: replicas that run concurrently and talk
through a :class:`~fdp.backends._comm.Communicator`.

A subclass says where replicas live (``devices``), which of them this process runs
(``local_replicas``) and how to run them (``run_replicas``). Everything else — ``pmap``'s
``map``, and the data-parallel ``value_and_grad`` — is written once here against that.

``value_and_grad`` differentiates *inside* each replica with tape autograd and reduces the
gradients with one bucketed all-reduce, as DDP does; each replica only ever sees its own rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fdp import _tree
from fdp._buffers import exchange_buffers
from fdp._collectives import all_gather
from fdp._compat import compiling, in_functorch_transform
from fdp._layout import Layout
from fdp.backends._base import Backend, GradPlan, MapBody, Params, PyTree, Replica
from fdp.backends._comm import Communicator
from fdp.backends._frame import AxisFrame, bind_axis
from fdp.backends._options import Randomness


class SpmdBackend(Backend):
    """Base of the backends whose replicas are threads or processes."""

    devices: tuple[torch.device, ...]  # one per replica (all replicas, not only local ones)

    @property
    @abstractmethod
    def local_replicas(self) -> tuple[int, ...]:
        """Indices of the replicas this process runs."""

    @abstractmethod
    def comm(self) -> Communicator:
        """The communicator of the whole axis."""

    @abstractmethod
    def active_comm(self, replicas: tuple[int, ...]) -> Communicator | None:
        """A communicator over the listed replicas only (``None`` on a replica outside them;
        on the distributed backend every rank must call this, to create process groups)."""

    @abstractmethod
    def run_replicas(self, fn: Callable[[int], Any]) -> list[Any]:
        """``[fn(r) for r in local_replicas]``, each replica concurrently where it applies.

        Inside ``fn``, ``self.comm().index()`` is ``r``. An exception in a replica is re-raised
        here naming the replica and its device; no replica is left waiting.
        """

    @property
    def local_size(self) -> int:
        return len(self.local_replicas)

    @property
    def home(self) -> torch.device:
        """Where this process keeps replicated values (a leading axis of local replicas)."""
        return self.devices[self.local_replicas[0]]

    def check_transforms(self, fn: str) -> None:
        """torch.func transforms and torch.compile cannot follow replicas into other threads
        or processes; refuse instead of returning numbers that miss the transform."""
        if compiling() or in_functorch_transform():
            raise RuntimeError(
                f"{fn} on a {self.name} mesh cannot run under torch.func transforms or "
                f"torch.compile: its replicas run in other threads/processes, which the "
                f"transform does not reach. Call fdp.value_and_grad / fdp.data_parallel_step "
                f"on this mesh (they differentiate inside each replica), or use fdp.Mesh(n)"
            )

    # --- pmap -------------------------------------------------------------------------------

    def map(self, body: MapBody, mapped: Sequence[torch.Tensor], in_dims: Sequence[int],
            randomness: Randomness = "error") -> list[torch.Tensor]:
        self.check_transforms("pmap")
        local = {r: i for i, r in enumerate(self.local_replicas)}

        def replica(r: int) -> list[torch.Tensor]:
            dev = self.devices[r]
            args = to_device([t.select(d, local[r]) for t, d in zip(mapped, in_dims,
                                                                    strict=True)], dev)
            me = Replica(torch.tensor(r, device=dev), self.comm(), self.tape_collectives)
            return list(body(me, *args))

        with self.policed_randomness(randomness, "pmap"):
            results = self.run_replicas(replica)
        return [self._stack([res[j] for res in results], f"output {j}")
                for j in range(len(results[0]))]

    def _stack(self, values: list[torch.Tensor], what: str) -> torch.Tensor:
        kinds = {(tuple(v.shape), v.dtype) for v in values}
        if len(kinds) > 1:
            per = ", ".join(f"replica {r}: {v.dtype}{list(v.shape)}"
                            for r, v in zip(self.local_replicas, values, strict=True))
            raise ValueError(f"pmap: {what} has a different shape or dtype on different "
                             f"replicas ({per}); every replica must return the same")
        return torch.stack([v.to(self.home) for v in values])

    # --- value_and_grad ---------------------------------------------------------------------

    def value_and_grad(self, plan: GradPlan, params: Params,
                       batch: PyTree) -> tuple[Any, Params]:
        self.check_transforms("value_and_grad")
        if any(p.requires_grad for p in params.values()):
            raise ValueError(
                f"value_and_grad on a {self.name} mesh differentiates inside each replica and "
                f"cannot extend an outer autograd graph; pass detached params (or use "
                f"fdp.Mesh(n) for higher-order gradients)"
            )
        step = _WeightedStep(self, plan, params, batch) if plan.strategy == "weighted" \
            else _GatheredStep(self, plan, params, batch)
        with self.policed_randomness(plan.randomness, "value_and_grad"):
            results = self.run_replicas(step.replica)
        return step.combine(results)

    @contextlib.contextmanager
    def policed_randomness(self, mode: Randomness, fn: str) -> Iterator[None]:
        """torch's own random ops draw from the process's global generators here, which the
        replica threads share; ``"error"`` (the default) is enforced by checking that the
        generators did not move, as vmap raises on the vmap backend."""
        if mode == "same" and self.replicas_share_generator:
            raise ValueError(
                f"{fn}: randomness='same' is not available on a {self.name} mesh: its replicas "
                f"share the process's generator. Draw with fdp.random keys (the same values on "
                f"every backend) or use fdp.Mesh(n)"
            )
        if mode != "error":
            yield
            return
        before = _generator_states(self.devices)
        yield
        if not all(torch.equal(a, b) for a, b in
                   zip(before, _generator_states(self.devices), strict=True)):
            # a ValueError, as the vmap backend's error for the same mistake
            raise ValueError(
                f"{fn}: torch's generator moved during the step: a random op (e.g. dropout) ran "
                f"in a replica with randomness='error' (or another thread of yours drew random "
                f"numbers meanwhile: the generator is shared). "
                f"Pass randomness='different' (draws then depend on the backend and, on "
                f"threads, on scheduling), or draw with fdp.random keys (key=, with layers "
                f"converted by fdp.nn.convert_dropout), which give the same values on every "
                f"backend"
            )

    def backward_and_reduce(self, comm: Communicator, term: torch.Tensor, params: Params,
                            keep_none: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """This replica's gradient of ``term`` summed over replicas, and the summed ``term``.

        Differentiates, then reduces in one bucketed all-reduce; a backend may override it to
        overlap the reduction with backward (the distributed backend does). With ``keep_none``
        a parameter that has no gradient on any replica gets ``None``.
        """
        grads = (torch.autograd.grad(term, list(params.values()), allow_unused=True)
                 if term.requires_grad else [None] * len(params))
        return _ReplicaStep.reduce_grads(comm, params, grads, term, keep_none)


def _generator_states(devices: Sequence[torch.device]) -> list[torch.Tensor]:
    states = [torch.default_generator.get_state()]
    for index in sorted({d.index or 0 for d in devices if d.type == "cuda"}):
        states.append(torch.cuda.default_generators[index].get_state())
    return states


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Moves tensors to ``device`` with one copy per dtype (coalesced), keeping autograd."""
    moving = [i for i, t in enumerate(tensors) if t.device != device]
    if not moving:
        return list(tensors)
    out = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in moving:
        by_dtype.setdefault(tensors[i].dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(device)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            out[i] = part.view(tensors[i].shape)
    return out


class _ReplicaStep:
    """One data-parallel gradient computation, split into the part every replica runs."""

    def __init__(self, backend: SpmdBackend, plan: GradPlan, params: Params,
                 batch: PyTree) -> None:
        self.backend, self.plan, self.params = backend, plan, params
        self.leaves, self.treedef = _tree.flatten(batch)
        self.dims = [plan.layout.dim % x.dim() if isinstance(x, torch.Tensor) else None
                     for x in self.leaves]

    def setup(self, r: int) -> tuple[torch.device, Params, Communicator, AxisFrame]:
        dev = self.backend.devices[r]
        keys = list(self.params)
        moved = to_device([self.params[k].detach() for k in keys], dev)
        params = {k: v.detach().requires_grad_() for k, v in zip(keys, moved, strict=True)}
        comm = self.backend.comm()
        offset = torch.tensor(self.plan.layout.offsets[r], device=dev)
        frame = AxisFrame(self.plan.axis_name, self.backend.size,
                          torch.tensor(r, device=dev), comm=comm, offset=offset)
        return dev, params, comm, frame

    def active_frame(self, r: int, frame: AxisFrame) -> AxisFrame:
        """The axis ``loss_fn`` sees: the replicas that received rows, as on the vmap backend
        (replicas without rows do not run, so collectives must not wait for them)."""
        active = tuple(i for i, s in enumerate(self.plan.layout.sizes) if s > 0)
        if len(active) == self.backend.size:
            return frame
        comm = self.backend.active_comm(active)  # every replica calls it (see distributed)
        if r not in active or comm is None:
            return frame
        return dataclasses.replace(frame, size=len(active), comm=comm,
                                   index=torch.tensor(active.index(r), device=frame.index.device))

    def shard(self, r: int, dev: torch.device, rows: torch.Tensor | None = None) -> Any:
        off, n = self.plan.layout.offsets[r], self.plan.layout.sizes[r]
        parts = []
        for leaf, d in zip(self.leaves, self.dims, strict=True):
            if d is None:
                parts.append(leaf)
            elif rows is not None:
                parts.append(leaf.index_select(d, rows.to(leaf.device)))
            else:
                parts.append(leaf.narrow(d, off, n))
        tensors = [p for p in parts if isinstance(p, torch.Tensor)]
        moved = iter(to_device(tensors, dev))
        parts = [next(moved) if isinstance(p, torch.Tensor) else p for p in parts]
        return _tree.unflatten(parts, self.treedef)

    def args_on(self, dev: torch.device) -> tuple:
        leaves = _tree.flatten(self.plan.args)[0]
        if all(x.device == dev for x in leaves if isinstance(x, torch.Tensor)):
            return self.plan.args
        return tuple(_tree.map_with_path(
            lambda _, x: x.to(dev) if isinstance(x, torch.Tensor) else x, a)
            for a in self.plan.args)

    @staticmethod
    def reduce_grads(comm: Communicator, params: Params,
                     grads: Sequence[torch.Tensor | None], loss: torch.Tensor,
                     keep_none: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sums ``loss`` and ``grads`` over the replicas in one bucketed all-reduce; with
        ``keep_none`` one more entry counts the replicas that had each gradient, so that a
        parameter no replica's loss reached gets ``None`` on every replica."""
        first = next(iter(params.values()))
        dense = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params.values(), grads, strict=True)]
        extra = [torch.tensor([g is not None for g in grads], dtype=first.dtype,
                              device=first.device)] if keep_none else []
        loss = loss.detach().to(first.dtype)
        total, *summed = comm.all_reduce_many([loss, *dense, *extra], "sum")
        if keep_none:
            had = summed.pop().tolist()
            return total, {k: g if n > 0 else None
                           for k, g, n in zip(params, summed, had, strict=True)}
        return total, dict(zip(params, summed, strict=True))


class _WeightedStep(_ReplicaStep):
    """Each replica's loss weighted by its rows; gradients summed over replicas."""

    def replica(self, r: int) -> Any:
        plan = self.plan
        dev, params, comm, frame = self.setup(r)
        rows = plan.layout.sizes[r]
        buffers = None
        if plan.buffers is not None:
            keys = list(plan.buffers)
            buffers = dict(zip(keys, to_device([plan.buffers[k] for k in keys], dev),
                               strict=True))
        aux, new_buffers = None, buffers
        frame = self.active_frame(r, frame)
        if rows > 0:
            with bind_axis(frame):
                loss, aux, new_buffers = plan.call_loss(params, self.shard(r, dev), buffers,
                                                        self.args_on(dev), dev)
            term = loss * (rows / plan.layout.total if plan.reduction == "mean" else 1.0)
        else:  # the loss travels in the params' dtype so every replica's buckets match
            term = torch.zeros((), device=dev, dtype=next(iter(params.values())).dtype)
        dtype = term.dtype
        loss, grads = self.backend.backward_and_reduce(comm, term, params,
                                                       plan.unused == "none")
        loss = loss.to(dtype)
        if plan.buffer_policy is not None and new_buffers is not None:
            new_buffers = exchange_buffers(comm, new_buffers, plan.layout.sizes,
                                           plan.buffer_policy)
        return loss, grads, aux, new_buffers

    def combine(self, results: list) -> tuple[Any, dict]:
        plan, home = self.plan, self.backend.home
        loss, grads, _, new_buffers = results[0]
        grads = {k: None if v is None else v.to(home) for k, v in grads.items()}
        out = loss.to(home)
        if plan.has_aux:
            out = (out, _stack_tree([res[2] for res in results if res[2] is not None], home))
        if plan.buffer_policy is None:
            return out, grads
        return (out, {k: v.to(home) for k, v in new_buffers.items()}), grads


class _GatheredStep(_ReplicaStep):
    """Forward per replica on padded shards, outputs all-gathered, one criterion everywhere."""

    def replica(self, r: int) -> Any:
        plan, layout = self.plan, self.plan.layout
        dev, params, comm, frame = self.setup(r)
        rows = layout.padded_index()[r * layout.max_size:(r + 1) * layout.max_size]
        mask = (torch.arange(layout.max_size) < layout.sizes[r]).to(dev)
        frame = dataclasses.replace(frame, mask=mask)
        with bind_axis(frame):
            shard = self.shard(r, dev, rows)
            outputs = plan.call_forward(params, shard, dev)
            gathered = _tree.map_with_path(
                lambda path, x: _gather_rows(x, frame, plan.out_dim, layout, path), outputs,
                root="out")
            result = plan.call_criterion(gathered, self.shard_all(dev))
        loss, aux = result if plan.has_aux else (result, None)
        _, grads = self.backend.backward_and_reduce(comm, loss / self.backend.size, params,
                                                    plan.unused == "none")
        return loss.detach(), grads, aux

    def shard_all(self, dev: torch.device) -> Any:
        tensors = [x for x in self.leaves if isinstance(x, torch.Tensor)]
        moved = iter(to_device(tensors, dev))
        return _tree.unflatten([next(moved) if isinstance(x, torch.Tensor) else x
                                for x in self.leaves], self.treedef)

    def combine(self, results: list) -> tuple[Any, dict]:
        home = self.backend.home
        loss, grads, aux = results[0]
        grads = {k: None if v is None else v.to(home) for k, v in grads.items()}
        if self.plan.has_aux:
            aux = _tree.map_with_path(
                lambda _, x: x.detach().to(home) if isinstance(x, torch.Tensor) else x, aux)
            return (loss.to(home), aux), grads
        return loss.to(home), grads


def _gather_rows(x: Any, frame: AxisFrame, dim: int, layout: Layout, path: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim() \
            or x.shape[dim] != layout.max_size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"value_and_grad: forward returned {shape} at {path} for a shard of "
            f"{layout.max_size} rows; with strategy='gather' it must return per-example "
            f"outputs (tensors with the rows at dim={dim})"
        )
    d = dim % x.dim()
    everything = all_gather(x, frame.name, axis=d, tiled=True)
    return everything.index_select(d, layout.real_index(x.device))


def _stack_tree(trees: list[Any], device: torch.device) -> Any:
    if not trees:
        return {}
    flats = [_tree.flatten(t) for t in trees]
    cols = zip(*(f[0] for f in flats), strict=True)
    return _tree.unflatten([torch.stack([c.detach().to(device) for c in col]) for col in cols],
                           flats[0][1])
