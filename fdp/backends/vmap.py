"""The vmap backend: N virtual replicas on one device, a replica is a slice of a vmapped axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.func import grad_and_value, vmap

from fdp import _check, _tree
from fdp._buffers import reduce_buffers
from fdp._compat import add_note, compiling, functorch_kinds, in_functorch_transform
from fdp.backends._base import Backend, GradPlan, MapBody, Params, PyTree, Replica
from fdp.backends._comm import Unreachable
from fdp.backends._fallback import (
    autocast_reason,
    first_line,
    may_fall_back,
    vmap_limitation,
    warn_fallback,
)
from fdp.backends._frame import AxisFrame, bind_axis
from fdp.backends._options import Executor, Randomness, Unused, check_executor
from fdp.backends._replay import Replays
from fdp.backends._stacked import StackedPlacement
from fdp.backends.threads import ThreadsBackend

Groups = list[tuple[int, int, int]]
GroupInputs = Callable[[int, int, int], list[torch.Tensor]]
PerReplica = Callable[[Callable[..., Any]], Callable[..., Any]]
Total = Callable[[Params], tuple[torch.Tensor, Any]]
T = TypeVar("T")


class VmapBackend(StackedPlacement):
    """Replicated values are tensors with a leading replica axis of size N on one device.

    The replicas run in one ``torch.func.vmap`` (the fast path) or, where vmap cannot run the
    function, on the *general executor*: a threads backend with one replica per thread on the
    same device (see :class:`fdp.FallbackWarning` and :class:`fdp.Mesh`'s ``executor``).
    """

    name = "vmap"

    def __init__(self, size: int, device: torch.device, executor: Executor = "auto",
                 timeout: float = 300.0) -> None:
        self.size = size
        self.device = device
        self.devices = (device,) * size
        self.executor = executor
        self.timeout = timeout  # of the general executor's replicas
        self._general: ThreadsBackend | None = None
        self._replays: Replays | None = None

    @classmethod
    def create(cls, n: object, device: torch.device | str | None, executor: object = "auto",
               timeout: object = 300.0) -> VmapBackend:
        """Validates ``fdp.Mesh(n, device=..., executor=...)``'s arguments."""
        if not _check.is_int(n):
            raise TypeError(f"Mesh: n must be an int, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"Mesh: n must be ≥ 1 replicas, got n={n}")
        return cls(n, _check.device(device, "Mesh", "device"), check_executor(executor, "Mesh"),
                   _check.positive_number(timeout, "Mesh", "timeout", " of seconds"))

    @property
    def home(self) -> torch.device:
        return self.device

    def placement(self) -> str:
        where = f"device={str(self.device)!r}"
        return where if self.executor == "auto" else f"{where}, executor={self.executor!r}"

    def subgroup(self, size: int) -> VmapBackend:
        return VmapBackend(size, self.device, self.executor, self.timeout)

    def __eq__(self, other: object) -> bool:  # virtual replicas: equal when built alike
        if isinstance(other, VmapBackend):
            return (self.size, self.device, self.executor) == (other.size, other.device,
                                                               other.executor)
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash((self.name, self.size, self.device, self.executor))

    def __reduce__(self) -> tuple[Any, ...]:
        return (VmapBackend, (self.size, self.device, self.executor, self.timeout))

    # --- the executors ----------------------------------------------------------------------

    def general(self) -> ThreadsBackend:
        """The general executor: one thread per replica on this backend's device."""
        if self._general is None:
            self._general = ThreadsBackend(self.devices, self.timeout, repeats_ok=True)
        return self._general

    @property
    def replay_graphs(self) -> int:
        """How many traced steps ``executor="replay"`` keeps (one per input signature)."""
        return 0 if self._replays is None else len(self._replays)

    def _replayer(self) -> Replays:
        if self._replays is None:
            self._replays = Replays(self.size, self.device)
        return self._replays

    def _run(self, what: str, fast: Callable[[], T],
             general: Callable[[Backend], T]) -> T:
        """``fast()`` (vmap), or ``general(executor)`` as the executor option says."""
        if self.executor == "general":
            return general(self.general())
        transformed = compiling() or in_functorch_transform()
        reason = autocast_reason(self.device) if self.executor != "vmap" else None
        if reason is not None and not transformed:
            warn_fallback(what, reason, self.size, self.device)
            return general(self.general())
        try:
            return fast()
        except Exception as error:
            if self.executor == "vmap" or not may_fall_back(error):
                raise
            reason = vmap_limitation(error)
            if transformed:  # threads cannot run under torch.func or torch.compile
                add_note(error, f"{what}: torch.func.vmap cannot run "
                                f"{reason or 'this function'}; outside torch.func transforms "
                                f"and torch.compile, fdp.Mesh({self.size}) runs it on its "
                                f"general executor")
                raise
            if reason is not None:
                warn_fallback(what, reason, self.size, self.device)
                return general(self.general())
            try:  # an error vmap does not name: a limitation if one device runs it
                result = general(self.general())
            except Exception:
                raise error from None
            warn_fallback(what, f"this function ({first_line(error)})", self.size, self.device)
            return result

    def map(self, body: MapBody, mapped: Sequence[torch.Tensor], in_dims: Sequence[int],
            randomness: Randomness = "error") -> list[torch.Tensor]:
        def fast() -> list[torch.Tensor]:
            index = torch.arange(self.size, device=self.device)
            run = vmap(lambda i, *ts: body(Replica(i, None, False), *ts),
                       in_dims=(0, *in_dims), out_dims=0, randomness=randomness)
            return list(run(index, *mapped))

        return self._run("pmap", fast,
                         lambda general: general.map(body, mapped, in_dims, randomness))

    def value_and_grad(self, plan: GradPlan, params: Params,
                       batch: PyTree) -> tuple[Any, Params]:
        def eager() -> tuple[Any, Params]:
            return self._run("value_and_grad", lambda: self._fused(plan, params, batch),
                             lambda general: general.value_and_grad(plan, params, batch))

        if self.executor == "replay" and not compiling():  # compiled: dynamo traces it
            return self._replayer().value_and_grad(self._fused, plan, params, batch, eager)
        return eager()

    def _fused(self, plan: GradPlan, params: Params, batch: PyTree) -> tuple[Any, Params]:
        """The fused formulation: gradient of the reduced, vmapped loss.

        Replicas with equal row counts that hold consecutive rows form one vmapped group whose
        inputs are views of the batch, so uneven splits need no padding and no mask.
        """
        leaves, treedef = _tree.flatten(batch)
        dims = [plan.layout.dim % leaf.dim() if _is_tensor(leaf) else None for leaf in leaves]
        groups = plan.layout.groups()
        if plan.buffer_policy == "sync" and len(groups) > 1:
            raise ValueError(
                f"value_and_grad: buffer_policy='sync' on the vmap backend needs every replica "
                f"to hold the same number of rows, but the batch of {plan.layout.total} splits "
                f"into {plan.layout.sizes}; use a batch size divisible by {self.size}, or a "
                f"threads mesh (fdp.Mesh(devices=[...])), where shards may differ"
            )
        buffers = plan.buffers if plan.buffer_policy is not None and plan.buffers else {}
        buffer_keys = list(buffers)

        def group_inputs(first: int, k: int, s: int) -> list[torch.Tensor]:
            # positions among the replicas that run (those with rows), as axis_size counts
            start = plan.layout.active_position(first)
            index = torch.arange(start, start + k, device=self.device)
            shard = [(leaf if k * s == leaf.shape[d] else leaf.narrow(d, first, k * s))
                     .unflatten(d, (k, s))
                     for leaf, d in zip(leaves, dims, strict=True) if d is not None]
            bufs = [buffers[key].unsqueeze(0).expand(k, *buffers[key].shape)
                    for key in buffer_keys]
            offsets = first + s * torch.arange(k, device=self.device)
            return [index, offsets, *bufs, *shard]

        comm = None if len(groups) == 1 else Unreachable(plan.layout.active_count, lambda: (
            f"collectives inside value_and_grad's loss_fn on the vmap backend need every "
            f"replica to hold the same number of rows, but the batch of {plan.layout.total} "
            f"splits into {plan.layout.sizes}; use a batch size divisible by the mesh size, "
            f"or a threads mesh (fdp.Mesh(devices=[...]))"))
        # Replicas without rows do not run: the axis the collectives see is the one group.
        axis_size = plan.layout.active_count

        def per_replica(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(index: torch.Tensor, offset: torch.Tensor, *tensors: torch.Tensor) -> Any:
                bufs = dict(zip(buffer_keys, tensors[:len(buffer_keys)], strict=True))
                it = iter(tensors[len(buffer_keys):])
                shard = [next(it) if d is not None else leaf
                         for leaf, d in zip(leaves, dims, strict=True)]
                frame = AxisFrame(plan.axis_name, axis_size, index, comm=comm, offset=offset,
                                  depth=len(functorch_kinds()) if compiling() else None)
                with bind_axis(frame):
                    return fn(_tree.unflatten(shard, treedef), bufs)
            return run

        in_dims = (0,) * (2 + len(buffer_keys)) + tuple(d for d in dims if d is not None)
        if plan.strategy == "weighted":
            total = _weighted_total(plan, groups, group_inputs, per_replica, in_dims)
        else:
            total = _gathered_total(plan, batch, groups, group_inputs, per_replica, in_dims)
        if _plain_autograd_ok(params):
            loss, (aux, stacked), grads = _autograd_value_and_grad(total, params, plan.unused)
        else:
            grads, (loss, (aux, stacked)) = grad_and_value(total, has_aux=True)(params)
        out = (loss, aux) if plan.has_aux else loss
        if plan.buffer_policy is None:
            return out, grads
        counts = [s for s in plan.layout.sizes if s > 0]
        return (out, reduce_buffers(stacked, counts, plan.buffer_policy)), grads


def _plain_autograd_ok(params: Params) -> bool:
    """Whether the faster tape-based autograd gives the same result as ``torch.func.grad``.

    That holds outside any torch.func transform and torch.compile (which trace ``torch.func``),
    when the params are not part of an outer autograd graph.
    """
    return (
        torch.is_grad_enabled()
        and not compiling()
        and not in_functorch_transform()
        and not any(p.requires_grad for p in params.values())
    )


def _autograd_value_and_grad(total: Total, params: Params, unused: Unused
                             ) -> tuple[Any, Any, Params]:
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss, extras = total(leaves)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()),
                                                 allow_unused=True), strict=True))
    if unused == "zeros":  # as torch.func.grad: a parameter the loss does not use gets zeros
        for k, g in grads.items():
            if g is None:
                grads[k] = torch.zeros_like(params[k])
    if extras != ({}, {}):  # only aux or buffers need detaching (skips two tree walks)
        extras = _tree.map_with_path(lambda _, x: x.detach() if _is_tensor(x) else x, extras)
    return loss.detach(), extras, grads


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _weighted_total(plan: GradPlan, groups: Groups, group_inputs: GroupInputs,
                    per_replica: PerReplica, in_dims: tuple[int, ...]) -> Total:
    batch_size = plan.layout.total

    def total(params: Params) -> tuple[torch.Tensor, Any]:
        acc: torch.Tensor | None = None
        auxes: list[Any] = []
        buffers: list[Any] = []
        for first, k, s in groups:
            # vmap outputs must be tensors: absent parts stay out (the loss alone is cheapest)
            fn = per_replica(lambda shard, bufs: _present(plan.call_loss(params, shard, bufs)))
            out = vmap(fn, in_dims=in_dims, randomness=plan.randomness)(
                *group_inputs(first, k, s))
            losses, aux, new_buffers = out if isinstance(out, tuple) else (out, None, None)
            weight = s / batch_size if plan.reduction == "mean" else 1.0
            term = losses.sum() * weight
            acc = term if acc is None else acc + term
            auxes.append(aux)
            buffers.append(new_buffers)
        aux = _tree.cat(auxes, 0) if plan.has_aux else {}
        stacked = _tree.cat(buffers, 0) if plan.buffer_policy is not None else {}
        assert acc is not None, "a layout has at least one group"
        return acc, (aux, stacked)

    return total


def _present(parts: tuple[Any, ...]) -> Any:
    """``(loss, aux, new_buffers)`` for vmap: the loss alone when the others are absent."""
    if parts[1] is None and parts[2] is None:
        return parts[0]
    return tuple({} if x is None else x for x in parts)


def _gathered_total(plan: GradPlan, batch: PyTree, groups: Groups,
                    group_inputs: GroupInputs, per_replica: PerReplica,
                    in_dims: tuple[int, ...]) -> Total:
    def total(params: dict) -> tuple[torch.Tensor, Any]:
        parts = []
        for first, k, s in groups:
            fn = per_replica(lambda shard, _: plan.call_forward(params, shard))
            out = vmap(fn, in_dims=in_dims, randomness=plan.randomness)(
                *group_inputs(first, k, s))
            parts.append(_tree.map_with_path(
                lambda path, x, s=s: _merge_replicas(path, x, plan.out_dim, s), out, root="out"))
        outputs = _tree.cat(parts, plan.out_dim)
        result = plan.call_criterion(outputs, batch)
        loss, aux = result if plan.has_aux else (result, {})
        return loss, (aux, {})

    return total


def _merge_replicas(path: str, x: Any, dim: int, rows: int) -> torch.Tensor:
    """``[k, ..., rows at dim, ...]`` -> ``[..., k * rows at dim, ...]`` (replica-major order)."""
    if not isinstance(x, torch.Tensor) or not -(x.dim() - 1) <= dim < x.dim() - 1 \
            or x.shape[1:][dim] != rows:
        shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"value_and_grad: forward returned {shape} at {path} for a shard of {rows} rows; "
            f"with strategy='gather' it must return per-example outputs (tensors with the "
            f"rows at dim={dim})"
        )
    d = dim % (x.dim() - 1)
    return x.movedim(0, d).flatten(d, d + 1)
