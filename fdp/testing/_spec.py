"""The arguments of :func:`fdp.testing.assert_dp_equivalent`: checks, ``Args``, ``Spec``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fdp import _check
from fdp._compat import pytree
from fdp._functionalize import Model
from fdp._inputs import batch_size
from fdp._layout import split_sizes
from fdp._mesh import Mesh
from fdp.backends._options import (
    BufferPolicy,
    Randomness,
    Reduction,
    SplitRule,
    Strategy,
    check_buffer_policy,
    check_randomness,
    check_reduction,
    check_strategy,
)

__all__ = ["Args", "Spec", "call_args", "default_inputs", "make_spec", "meshes", "shard"]

FN = "assert_dp_equivalent"


class Args:
    """Positional and keyword arguments for the model, as ``inputs(batch)`` returns them.

    ``inputs`` may return a single value (the model's one positional argument) or
    ``Args(*args, **kwargs)`` for several arguments or keyword arguments.

    Example:
        >>> a = fdp.testing.Args(torch.ones(2, 3), scale=2.0)
        >>> len(a.args), sorted(a.kwargs)
        (1, ['scale'])
    """

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        parts = [type(a).__name__ for a in self.args] + [f"{k}=..." for k in self.kwargs]
        return f"Args({', '.join(parts)})"


def call_args(value: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for the model from what ``inputs(batch)`` returned."""
    if isinstance(value, Args):
        return value.args, dict(value.kwargs)
    return (value,), {}


def default_inputs(batch: Any) -> Any:
    """The model's input: the batch itself (a tensor), ``batch[0]`` or ``batch["x"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    raise ValueError(f"{FN}: cannot tell the model's input in a {type(batch).__name__} batch "
                     f"(the default takes batch[0] or batch['x']); pass inputs=, e.g. "
                     f"inputs=lambda batch: batch['image']")


def shard(batch: Any, offset: int, size: int, rows: int) -> Any:
    """Rows ``offset:offset + size`` of every tensor in ``batch`` (other leaves as they are)."""
    return pytree.tree_map(
        lambda x: x.narrow(0, offset, size) if isinstance(x, torch.Tensor) and x.dim() else x,
        batch)


@dataclass(frozen=True)
class Spec:
    """The validated arguments of one :func:`assert_dp_equivalent` call."""

    module: nn.Module | None  # given a module: the user's (only ever deep-copied)
    model: Model | None  # given an fdp.Model
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    batch: Any
    rows: int
    inputs: Callable[[Any], Any]
    split: SplitRule
    steps: int
    optimizer: Any
    buffer_policy: BufferPolicy | None
    strategy: Strategy
    reduction: Reduction
    randomness: Randomness
    rtol: float | None
    atol: float | None

    @property
    def trains(self) -> bool:
        return self.steps > 1 or self.optimizer is not None

    def forward(self, params: dict, buffers: dict, batch: Any) -> tuple[Any, dict]:
        """The model's output and new buffers on ``batch``, through the functional model."""
        model = self.model
        assert model is not None
        args, kwargs = call_args(self.inputs(batch))
        return model.apply(params, buffers, *args, **kwargs)


def make_spec(model_or_apply: Any, loss_fn: Any, batch: Any, inputs: Any, split: Any, steps: Any,
          optimizer: Any, buffer_policy: Any, strategy: Any, reduction: Any, randomness: Any,
          rtol: Any, atol: Any) -> Spec:
    module, model = _model_arg(model_or_apply)
    _check.callable_(loss_fn, FN, "loss_fn")
    if inputs is not None:
        _check.callable_(inputs, FN, "inputs")
    rows = batch_size(batch, 0, FN, "batch")
    if isinstance(split, str):
        split_sizes(1, 1, split, FN)
    if _check.integer(steps, FN, "steps") < 1:
        raise ValueError(f"{FN}: steps must be >= 1, got {steps}")
    if optimizer is not None and not all(callable(getattr(optimizer, n, None))
                                         for n in ("init", "update")):
        raise TypeError(f"{FN}: optimizer must be an fdp.optim optimizer (with init and "
                        f"update), e.g. fdp.optim.sgd(0.1); got {type(optimizer).__name__}")
    buffer_policy = check_buffer_policy(buffer_policy, FN)
    strategy = check_strategy(strategy, FN)
    reduction = check_reduction(reduction, FN)
    randomness = check_randomness(randomness, FN)
    if buffer_policy is not None and strategy == "gather":
        raise ValueError(f"{FN}: buffer_policy works with strategy='weighted'")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (not _check.is_number(value) or value < 0):
            raise ValueError(f"{FN}: {name} must be a number >= 0 or None, got {value!r}")
    if model is not None:
        params, buffers = model.params, model.buffers
    else:  # read only (the runs use deep copies), as functionalize lists them
        assert module is not None
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = {k: v.detach() for k, v in module.named_buffers()}
    return Spec(module, model, params, buffers, loss_fn, batch, rows, inputs or default_inputs,
                split, steps, optimizer, buffer_policy, strategy, reduction, randomness, rtol,
                atol)


def _model_arg(value: Any) -> tuple[nn.Module | None, Model | None]:
    if isinstance(value, nn.Module):
        return value, None
    if isinstance(value, Model):
        _check.callable_(value.apply, FN, "model_or_apply.apply")
        _check.param_dict(value.params, FN, "model_or_apply.params")
        _check.param_dict(value.buffers, FN, "model_or_apply.buffers")
        return None, value
    raise TypeError(f"{FN}: model_or_apply must be a torch.nn.Module or an fdp.Model "
                    f"(fdp.functionalize(module)), got {type(value).__name__}")


def meshes(mesh: Any) -> list[Mesh]:
    if mesh is None:
        return [Mesh(4)]
    if isinstance(mesh, Mesh):
        return [mesh]
    if isinstance(mesh, Sequence) and not isinstance(mesh, str) and mesh and \
            all(isinstance(m, Mesh) for m in mesh):
        return list(mesh)
    raise TypeError(f"{FN}: mesh must be an fdp.Mesh or a non-empty sequence of them, got "
                    f"{mesh!r}; e.g. mesh=fdp.Mesh(4) or [fdp.Mesh(2), fdp.Mesh(3)]")


def cuda_indices(meshes: list[Mesh]) -> list[int]:
    return sorted({d.index or 0 for m in meshes for d in m.devices if d.type == "cuda"})
