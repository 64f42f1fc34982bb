"""The memory a training step reuses: ``fdp.data_parallel_step(..., donate=...)``.

``donate="state"``: the optimizer writes the new params and optimizer state into the input
state's tensors (the state is then donated, see ``fdp/_donation.py``).

``donate="auto"``: the step keeps the storage it allocated for the states it returned, one flat
buffer per dtype (the state's tensors of at least ``BIG`` elements are views of it; smaller
ones are allocated as usual, which costs no page faults). When no tensor but the step's own uses
that storage any more (c10's storage use count, :func:`fdp._compat.storage_use_count`, counts
every tensor object, view, alias, ``UntypedStorage`` and NumPy/DLPack export that keeps one
alive), nobody can read it, and the next step writes its new state there with ``out=`` kernels
instead of allocating. In ``state, metrics = step(state, batch)`` the state from two steps ago is
dead, so steady state allocates no parameter-size memory; a caller who keeps old states gets
fresh buffers. The input state is never written: the step stays pure. What the check cannot
see is a raw address (``data_ptr()``) kept past the tensors it came from.

Either way, temporaries of parameter size go to scratch buffers the step keeps and never hands
out, and the same kernels run as in the functional update (``fdp/optim/_into.py``), so the
results are bitwise those of ``donate="none"``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, NamedTuple

import torch

from fdp._compat import compiling, in_functorch_transform, pytree, storage_use_count
from fdp._donation import Donate
from fdp.optim import _into, apply_updates
from fdp.optim._base import apply_into
from fdp.optim._into import Into, Scratch
from fdp.optim._native import fully_native, is_native, written_state

__all__ = ["StepMemory"]

_ALIGN = 16  # elements: each leaf of a flat buffer starts on a 64-byte boundary (float32)
_REFUSED = ("data_parallel_step: donate='state' cannot update in place: {why}; build the step "
            "with donate='auto' (in place only where safe) or donate='none'")
_POOL = 3  # recycled states kept per step: the two in use, and one a frozen leaf pins


class _Buffers:
    """Storage for one state (params and optimizer state): a flat buffer per dtype and
    device, the leaves as views."""

    def __init__(self, signature: tuple, leaves: list[Any]) -> None:
        self.signature = signature
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        self.layout: list[tuple[tuple[torch.dtype, torch.device], int, torch.Size] | None] = []
        for x in leaves:
            if not isinstance(x, torch.Tensor) or x.numel() < _into.BIG:  # small: fresh is cheap
                self.layout.append(None)
                continue
            key = (x.dtype, x.device)
            offset = sizes.get(key, 0)
            self.layout.append((key, offset, x.shape))
            sizes[key] = offset + -(-x.numel() // _ALIGN) * _ALIGN
        self.flats = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in sizes.items()}
        # torch caches one UntypedStorage object per storage: holding it here, a caller who
        # holds it too shows in its reference count (it does not in the storage use count)
        self.storages = [f.untyped_storage() for f in self.flats.values()]
        self.alone = self._holders()

    def _holders(self) -> list[tuple[int, int]]:
        return [(storage_use_count(f), sys.getrefcount(s))
                for f, s in zip(self.flats.values(), self.storages, strict=True)]

    def dead(self) -> bool:
        """Whether nothing outside this object can reach the storage: no tensor (view,
        alias, one an array or a DLPack capsule keeps), no storage object, no shared memory
        another process may map."""
        return (self._holders() == self.alone
                and not any(f.is_shared() for f in self.flats.values()))

    def views(self) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for where in self.layout:
            if where is None:
                out.append(None)
                continue
            key, offset, shape = where
            out.append(self.flats[key][offset:offset + shape.numel()].view(shape))
        return out


class _Plan(NamedTuple):
    params: Any  # destinations of the new params (a tree like them), or None
    opt_state: Any  # destinations of the new optimizer state, or None


class StepMemory:
    """What one step function reuses between calls (see the module docstring)."""

    def __init__(self, donate: Donate, optimizer: Any) -> None:
        self.donate = donate
        self.opt_update = optimizer.update
        self.native = is_native(optimizer.update)
        self.complete = fully_native(optimizer.update)
        self.pool: list[_Buffers] = []
        self.scratch = Scratch()
        self.lock = threading.Lock()

    def update(self, optimizer: Any, grads: Any, state: Any) -> tuple[Any, Any, bool]:
        """``(params, opt_state, donated)``: the optimizer step on ``state`` (a TrainState);
        ``donated``: the input state's storage now holds the result."""
        mode = self._mode(state, grads)
        if mode == "none" or not self.lock.acquire(blocking=False):  # another thread has it
            if mode == "state":
                raise ValueError("data_parallel_step: a step built with donate='state' ran in "
                                 "two threads at once; build one step per thread")
            return (*_functional(optimizer, grads, state), False)
        try:
            plan = self._state_plan(state) if mode == "state" else self._auto_plan(state)
            into = Into(plan.opt_state, self.scratch, True) if self.native else None
            extra = {} if into is None else {"_into": into}
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
            params = apply_into(state.params, updates, plan.params)
        finally:
            self.lock.release()
        return params, opt_state, mode == "state"

    def _state_plan(self, state: Any) -> _Plan:
        # a user's transformation may keep the params it is given: those are not overwritten
        return _Plan(state.params if self.complete else None,
                     state.opt_state if self.native else None)

    def _auto_plan(self, state: Any) -> _Plan:
        p_leaves, p_spec = pytree.tree_flatten(state.params)
        o_leaves, o_spec = pytree.tree_flatten(state.opt_state)
        leaves = p_leaves + o_leaves
        signature = (p_spec, o_spec, tuple(
            (x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None
            for x in leaves))
        buffers = self._claim(signature, leaves)
        views = buffers.views()
        n = len(p_leaves)
        return _Plan(pytree.tree_unflatten(views[:n], p_spec),
                     pytree.tree_unflatten(views[n:], o_spec))

    def _claim(self, signature: tuple, leaves: list[Any]) -> _Buffers:
        for b in self.pool:
            if b.signature == signature and b.dead():
                self.pool.remove(b)
                self.pool.append(b)  # most recently used last
                return b
        b = _Buffers(signature, leaves)
        self.pool.append(b)
        if len(self.pool) > _POOL:
            self.pool.pop(0)  # its state lives on with whoever holds it, as fresh tensors
        return b

    def _mode(self, state: Any, grads: Any) -> str:
        """The mode this call runs in: ``"none"`` where in-place writes are not safe."""
        if self.donate == "none":
            return "none"
        if compiling():  # traced: functional in every mode (a raise here would only make
            return "none"  # dynamo run this frame eagerly, see docs/training.md)
        if in_functorch_transform():
            return self._refuse("a torch.func transform runs the step")
        mine = _tensors(state.params, state.opt_state)
        theirs = _tensors(grads)
        why = _cannot(mine + theirs)
        if why is None and self.donate == "state":
            written = written_state(self.opt_update, state.opt_state)
            if self.complete:
                written += _tensors(state.params)
            why = _overlapping(written, mine, theirs, state, grads)
        if why is None:
            if self.donate == "auto" and not _worth_it(mine):
                return "none"
            return self.donate
        return self._refuse(why)

    def _refuse(self, why: str) -> str:
        """``"none"`` for ``"auto"``; a clear error for ``"state"``."""
        if self.donate == "state":
            raise ValueError(_REFUSED.format(why=why))
        return "none"


def _functional(optimizer: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return apply_updates(state.params, updates), opt_state


def _tensors(*trees: Any) -> list[torch.Tensor]:
    return [x for t in trees for x in pytree.tree_leaves(t) if isinstance(x, torch.Tensor)]


def _cannot(tensors: list[torch.Tensor]) -> str | None:
    """Why no update of this call may write in place, or None."""
    if any(x.requires_grad for x in tensors):
        return ("a tensor of the state or a gradient requires grad (it is part of an "
                "autograd graph, which in-place writes would break)")
    return None


def _worth_it(tensors: list[torch.Tensor]) -> bool:
    """Whether ``"auto"`` recycles for this state: on the CPU, with a leaf of
    ``fdp.optim._into.BIG`` elements or more (smaller tensors allocate without page faults)."""
    return (all(x.device.type == "cpu" for x in tensors)
            and any(x.numel() >= _into.BIG for x in tensors))


def _overlapping(written: list[torch.Tensor], mine: list[torch.Tensor],
                 theirs: list[torch.Tensor], state: Any, grads: Any) -> str | None:
    """Why the ``written`` tensors cannot each be overwritten on their own, or None: one is
    not contiguous, or it shares memory with another tensor of the state (``mine``) or a
    gradient (``theirs``). The key paths are worked out only for the message."""
    ids = {id(x) for x in written}
    spans = []
    for k, x in enumerate(mine + theirs):
        if x.numel() == 0:
            continue
        w = id(x) in ids and k < len(mine)
        if w and not x.is_contiguous():
            return f"{_name(k, state, grads)} is not contiguous"
        spans.append((*_span(x), w, k))
    spans.sort(key=lambda s: s[:2])
    reach: Any = None  # the span that ends last among those seen
    reach_written: Any = None  # the same among the written ones
    for b in spans:
        for a in (reach, reach_written):
            if a is not None and b[0] < a[1] and (a[2] or b[2]):
                return f"{_name(a[3], state, grads)} and {_name(b[3], state, grads)} share memory"
        if reach is None or b[1] > reach[1]:
            reach = b
        if b[2] and (reach_written is None or b[1] > reach_written[1]):
            reach_written = b
    return None


def _name(k: int, state: Any, grads: Any) -> str:
    """The key path of tensor ``k`` of the state's and then the grads' tensors (for an error
    message)."""
    names = [f"{root}{pytree.keystr(path)}"
             for root, tree in (("state.params", state.params),
                                ("state.opt_state", state.opt_state), ("grads", grads))
             for path, leaf in pytree.tree_flatten_with_path(tree)[0]
             if isinstance(leaf, torch.Tensor)]
    return names[k]


def _span(x: torch.Tensor) -> tuple[int, int]:
    """The bytes ``x`` reads: exact when contiguous, else its whole storage."""
    if x.is_contiguous():
        return x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
    storage = x.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()
