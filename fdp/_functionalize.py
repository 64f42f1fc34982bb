"""``fdp.functionalize``: an ``nn.Module`` as a pure function plus parameter/buffer dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from fdp import _check

__all__ = ["Model", "functionalize"]

Params = dict[str, torch.Tensor]


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
    module in its current train/eval mode.

    Example:
        >>> model = fdp.functionalize(torch.nn.Linear(3, 2))
        >>> out, new_buffers = model.apply(model.params, model.buffers, torch.ones(4, 3))
        >>> out.shape
        torch.Size([4, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    param_names, buffer_names = frozenset(params), frozenset(buffers)

    def apply(params: Params, buffers: Params, *args: Any, **kwargs: Any) -> tuple[Any, Params]:
        _check_state(params, param_names, "params")
        _check_state(buffers, buffer_names, "buffers")
        # Copies are what the module may update in place; the caller's tensors stay untouched.
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        out = functional_call(module, (params, new_buffers), args, kwargs, tie_weights=True,
                              strict=True)
        return out, new_buffers

    return Model(apply, params, buffers)


def _check_state(state: Any, expected: frozenset[str], name: str) -> None:
    _check.param_dict(state, "apply", name)
    if state.keys() != expected:
        missing = sorted(expected - state.keys())
        extra = sorted(state.keys() - expected)
        raise ValueError(
            f"apply: {name} does not match the module: missing {missing}, unexpected {extra}; "
            f"start from fdp.functionalize(module).{name}"
        )
