"""``fdp.functionalize``: an ``nn.Module`` as a pure function plus parameter/buffer dicts."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from fdp import _check
from fdp._compat import UninitializedTensorMixin, compiling
from fdp._tree import Params

__all__ = ["Model", "functionalize"]



class Model(NamedTuple):
    """A module split into a pure ``apply`` and its state.

    Attributes:
        apply: ``apply(params, buffers, *args, **kwargs) -> (output, new_buffers)``.
        params: parameter name -> tensor (detached; tied parameters appear once).
        buffers: buffer name -> tensor (detached).
    """

    apply: Callable[..., tuple[Any, Params]]
    params: Params
    buffers: Params


def functionalize(module: nn.Module) -> Model:
    """Turns ``module`` into a pure function and its parameter/buffer dicts.

    ``apply`` never writes to the dicts or tensors it is given: buffers that the module updates
    in its forward (BatchNorm's running statistics, ``num_batches_tracked``) are copied first
    and the updated copies are returned as ``new_buffers``. The returned ``params``/``buffers``
    share storage with the module (no copy); fdp never writes to them. ``apply`` runs the
    module in its current train/eval mode, and, as torch does, computes no gradient for a
    parameter whose ``requires_grad`` is ``False`` in the module (frozen): its gradient is zero
    (``None`` with ``value_and_grad(..., unused="none")``, and ``fdp.data_parallel_step`` leaves
    it untouched, as ``torch.optim`` does).

    Example:
        >>> model = fdp.functionalize(torch.nn.Linear(3, 2))
        >>> out, new_buffers = model.apply(model.params, model.buffers, torch.ones(4, 3))
        >>> out.shape
        torch.Size([4, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    check_initialized(module, "functionalize")
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    param_shapes = {k: v.shape for k, v in params.items()}
    buffer_shapes = {k: v.shape for k, v in buffers.items()}
    instances = _Instances(module)

    def apply(params: Params, buffers: Params, *args: Any, **kwargs: Any) -> tuple[Any, Params]:
        _check_state(params, param_shapes, "params")
        _check_state(buffers, buffer_shapes, "buffers")
        # Copies are what the module may update in place; the caller's tensors stay untouched.
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        if compiling():
            # one dict: functional_call writes buffers the module re-assigns back into it
            frozen = {k for k, p in module.named_parameters() if not p.requires_grad}
            state = {**{k: v.detach() if k in frozen else v for k, v in params.items()},
                     **new_buffers}
            out = functional_call(module, state, args, kwargs, tie_weights=True, strict=True)
            new_buffers = {k: state[k] for k in new_buffers}
        else:
            with instances.borrow() as (mod, slots):
                out = _call_with(mod, slots, params, new_buffers, args, kwargs)
        return out, new_buffers

    apply.module = module  # type: ignore[attr-defined]  # for diagnostics (fdp.testing)
    return Model(apply, params, buffers)


def uninitialized(module: nn.Module) -> list[str]:
    """Names of the lazy parameters and buffers (``nn.LazyLinear``, ...) not yet initialized."""
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()]
            if isinstance(t, UninitializedTensorMixin)]


def check_initialized(module: nn.Module, fn: str) -> None:
    """A clear error for lazy modules whose shapes are not known yet."""
    lazy = uninitialized(module)
    if lazy:
        raise ValueError(
            f"{fn}: the module's lazy parameters {lazy[:3]}{' ...' if len(lazy) > 3 else ''} "
            f"are not initialized yet, so their shapes are unknown. Run the module once on one "
            f"device first (module(example_batch), e.g. on a few rows) to initialize them, then "
            f"hand it to fdp"
        )


class _Instances:
    """Copies of the module's structure (sharing its tensors), one per concurrent ``apply``.

    ``apply`` swaps tensors into module attributes for the duration of a call, so it never uses
    the caller's module itself (another thread may be using it, and must never see other
    tensors in it) and two threads (the threads backend runs one replica per thread) never use
    the same copy. Copies are marked as replicas, as ``nn.DataParallel``'s are, so that a
    ``zero_grad()`` inside the forward warns instead of clearing the real gradients.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.free: list[tuple[nn.Module, list[_Slot]]] = []
        self.lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[tuple[nn.Module, list[_Slot]]]:
        with self.lock:
            instance = self.free.pop() if self.free else None
        if instance is None:
            instance = self._copy()
        else:
            _sync_attributes(self.module, instance[0])
        try:
            yield instance
        finally:
            with self.lock:
                self.free.append(instance)

    def _copy(self) -> tuple[nn.Module, list[_Slot]]:
        tensors = [*self.module.named_parameters(remove_duplicate=False),
                   *self.module.named_buffers(remove_duplicate=False)]
        shared = {id(t): t for _, t in tensors}
        clone = copy.deepcopy(self.module, memo=dict(shared))
        for sub in clone.modules():
            sub.__dict__["_is_replica"] = True  # zero_grad() warns, as nn.DataParallel replicas
        return clone, _slots(clone)


# a copy's own state, and its per-instance forward (convert_dropout(functional=True)), which
# is bound to the copy itself: never taken from the original
_OWN_STATE = frozenset({"_parameters", "_buffers", "_modules", "forward"})


def _sync_attributes(original: nn.Module, copy_: nn.Module) -> None:
    """Brings a structural copy up to date with the original's modes and plain attributes
    (``.eval()``, a changed dropout ``p``), which may have changed since it was made."""
    for src, dst in zip(original.modules(), copy_.modules(), strict=True):
        for key, value in src.__dict__.items():
            if key not in _OWN_STATE and dst.__dict__.get(key, _OWN_STATE) is not value:
                dst.__dict__[key] = value


_Slot = tuple[nn.Module, str, str, str]  # (owner, "_parameters" | "_buffers", attribute, key)


def _slots(module: nn.Module) -> list[_Slot]:
    """Every parameter/buffer attribute, with the dict key it takes its value from.

    Tied attributes (the same tensor under several names) all read the first name's entry, as
    ``functional_call(..., tie_weights=True)`` does. Computed once, so ``apply`` does not walk
    the module tree on every call.
    """
    slots = []
    for kind, named in (("_parameters", module.named_parameters(remove_duplicate=False)),
                        ("_buffers", module.named_buffers(remove_duplicate=False))):
        first_name: dict[int, str] = {}
        for name, tensor in named:
            key = first_name.setdefault(id(tensor), name)
            owner, _, attr = name.rpartition(".")
            slots.append((module.get_submodule(owner), kind, attr, key))
    return slots


def _call_with(module: nn.Module, slots: list[_Slot], params: Params, buffers: Params,
               args: tuple, kwargs: dict) -> Any:
    """Runs ``module`` with its tensors swapped for ``params``/``buffers``, then restores them.

    ``buffers`` is the caller's private copy: a buffer the module re-assigns (rather than
    updating in place) is written back into it.
    """
    source = {"_parameters": params, "_buffers": buffers}
    saved: list[tuple[dict, str, Any]] = []
    try:
        for owner, kind, attr, key in slots:
            table = getattr(owner, kind)
            own = table[attr]
            saved.append((table, attr, own))
            value = source[kind][key]
            # a frozen parameter (requires_grad=False in the module) gets no gradient, as in torch
            table[attr] = value.detach() if kind == "_parameters" and not own.requires_grad \
                else value
        out = module(*args, **kwargs)
        for owner, kind, attr, key in slots:
            if kind == "_buffers" and owner._buffers[attr] is not buffers[key]:
                buffers[key] = owner._buffers[attr]  # type: ignore[assignment]  # may be None
        return out
    finally:
        for table, attr, value in reversed(saved):
            table[attr] = value


def _check_state(state: Any, shapes: dict[str, torch.Size], name: str) -> None:
    _check.param_dict(state, "apply", name)
    if state.keys() != shapes.keys():
        missing = sorted(shapes.keys() - state.keys())
        extra = sorted(state.keys() - shapes.keys())
        raise ValueError(
            f"apply: {name} does not match the module: missing {missing}, unexpected {extra}; "
            f"start from fdp.functionalize(module).{name}"
        )
    for key, value in state.items():
        if value.shape != shapes[key]:
            raise ValueError(
                f"apply: {name}[{key!r}] has shape {tuple(value.shape)} but the module's is "
                f"{tuple(shapes[key])}"
            )
