"""``fdp.Mesh(n, executor="replay")``: the vmap backend's step, traced once and replayed.

Eager ``torch.func.vmap`` pays per op: functorch wraps and unwraps every tensor, its batching
rules add ops (a shared ``Linear`` bias becomes ``bias * 1`` plus an ``add``; ``nll_loss`` is a
Python decomposition of about 20 ops), and the autograd tape records all of them. A replay
runs the same aten kernels from a graph traced once with fake tensors (see
``_replay_graph.py``): no functorch, no tape, no Python in between.

**When a replay is the eager step.** The graph records what the eager step does for one
*signature*: the structure of ``(params, batch, args, buffers, key)``, every tensor's shape,
strides, dtype, device, layout and ``requires_grad``, every other leaf's value, the plan's
options (loss function object, strategy, split, reduction, buffer policy, ...), grad mode and
the default dtype. A call with another signature traces again (at most :data:`LIMIT` graphs
are kept per mesh). What the signature cannot see is Python state that the loss reads from
outside its arguments: a global, or a closure variable rebound to another object, is read
once, when the graph is traced. Such a loss must not use this executor (docs/backends.md).

**What is refused.** torch's own random ops (``randomness="different"`` or ``"same"``) raise
``ValueError``: a replay would draw other values than the eager step (keyed randomness,
:mod:`fdp.random`, is a function of the key tensor and replays exactly). A step that cannot be
traced (``.item()``, an ``if`` on a tensor's value, an op fake tensors cannot run) runs
eagerly, with one :class:`fdp.FallbackWarning` per loss function and reason. Under
``torch.compile``, ``torch.func`` transforms or autocast, with parameters that require grad
(differentiating through the step), and for loss functions that are not hashable, every call
runs eagerly, without a warning.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import fx

from fdp import _tree
from fdp._compat import compiling, in_functorch_transform
from fdp.backends._fallback import FallbackWarning, _caller_level, autocast_reason, first_line
from fdp.backends._plan import GradPlan, Params, PyTree
from fdp.backends._replay_bind import bind_fast
from fdp.backends._replay_graph import random_ops, trace

__all__ = ["LIMIT", "Replays"]

T = TypeVar("T")
Fused = Callable[[GradPlan, Params, PyTree], Any]

LIMIT = 32
"""Graphs kept per mesh (least recently used first out)."""

_CONSTANT = (int, float, bool, str, type(None), torch.dtype, torch.device)


@dataclasses.dataclass(frozen=True)
class _Graph:
    """A traced step: ``module(*tensor_leaves)`` gives the output's tensor leaves."""

    module: fx.GraphModule
    spec: Any  # the output's treedef
    constants: tuple[Any, ...]  # the output's leaves, with None where a tensor goes

    def __call__(self, tensors: list[torch.Tensor]) -> Any:
        with torch.no_grad():
            out = iter(self.module(*tensors))
        return _tree.unflatten([next(out) if c is _TENSOR else c for c in self.constants],
                               self.spec)


@dataclasses.dataclass(frozen=True)
class _Eager:
    """A signature whose step runs eagerly; ``error`` is raised instead where set."""

    error: Exception | None = None


_TENSOR = object()  # marks a tensor leaf among an output's constants


class Replays:
    """The traced steps of one virtual mesh, by signature (see the module docstring)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.device = device
        self._graphs: OrderedDict[tuple, _Graph | _Eager] = OrderedDict()
        self._lock = threading.Lock()
        self._warned: set[tuple[Any, str]] = set()

    def __len__(self) -> int:
        return len(self._graphs)

    def value_and_grad(self, fused: Fused, plan: GradPlan, params: Params, batch: PyTree,
                       eager: Callable[[], T]) -> T:
        """The step's result from its graph, tracing it first for a new signature;
        ``eager()`` where a replay does not apply (see the module docstring)."""
        if not self._applies(params):
            return eager()
        leaves, tensors, treedef, signature = _signature(plan, params, batch)
        if signature is None:
            return eager()
        with self._lock:
            found = self._graphs.get(signature)
            if found is not None:
                self._graphs.move_to_end(signature)
        if found is None:
            return self._first(fused, plan, leaves, tensors, treedef, signature, eager)
        if isinstance(found, _Eager):
            if found.error is not None:
                raise ValueError(str(found.error))
            return eager()
        result: T = found(tensors)
        return result

    def _applies(self, params: Params) -> bool:
        return not (compiling() or in_functorch_transform()
                    or autocast_reason(self.device) is not None
                    or any(p.requires_grad for p in params.values()))

    def _first(self, fused: Fused, plan: GradPlan, leaves: list[Any],
               tensors: list[torch.Tensor], treedef: Any, signature: tuple,
               eager: Callable[[], T]) -> T:
        """Traces the step for a new signature and runs it (or runs it eagerly, and says so)."""
        try:
            graph = _traced(fused, plan, leaves, treedef)
        except Exception as error:  # the eager run below tells the user's errors
            result = eager()  # raises where the step itself is wrong
            self._keep(signature, _Eager())
            self._warn(plan.loss, first_line(error))
            return result
        drawn = random_ops(graph.module)
        if drawn:
            refused = ValueError(
                f"value_and_grad on fdp.Mesh({self.size}, executor='replay'): loss_fn draws "
                f"from torch's random generators ({', '.join(drawn)}, with "
                f"randomness={plan.randomness!r}), which a replay would not draw as the eager "
                f"step does. Draw with a key instead (key=fdp.random.key(seed) and keyed "
                f"layers such as fdp.nn.Dropout: a replay draws those exactly), or use "
                f"executor='auto'")
            self._keep(signature, _Eager(refused))
            raise refused
        bind_fast(graph.module)  # after the check above, which reads the aten ops' tags
        self._keep(signature, graph)
        replayed: T = graph(tensors)
        return replayed

    def _keep(self, signature: tuple, entry: _Graph | _Eager) -> None:
        with self._lock:
            self._graphs[signature] = entry
            while len(self._graphs) > LIMIT:
                self._graphs.popitem(last=False)

    def _warn(self, loss: Any, reason: str) -> None:
        with self._lock:
            if (loss, reason) in self._warned:
                return
            self._warned.add((loss, reason))
        warnings.warn(FallbackWarning(
            f"value_and_grad on fdp.Mesh({self.size}, executor='replay'): the step cannot be "
            f"traced for replay ({reason}), so for these shapes it runs eagerly (as "
            f"executor='auto' does) on every call. The results are the same; the speed is "
            f"eager vmap's (docs/performance.md). A loss that reads tensor values on the host "
            f"(.item(), an `if` on a tensor) cannot be replayed; pass executor='auto' to run "
            f"it eagerly without this warning"), stacklevel=_caller_level())


def _signature(plan: GradPlan, params: Params, batch: PyTree
               ) -> tuple[list[Any], list[torch.Tensor], Any, tuple | None]:
    """The inputs' leaves, their tensors, their treedef, and everything the trace depends on
    (``None``: something is not hashable, so no replay)."""
    leaves, treedef = _tree.flatten((params, batch, plan.args, plan.buffers, plan.key))
    tensors = []
    parts: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device,
                          leaf.layout, leaf.requires_grad))
        elif isinstance(leaf, _CONSTANT):
            parts.append((type(leaf), leaf))
        else:
            return leaves, tensors, treedef, None
    keyed = plan.key is not None
    signature = (plan.loss, plan.strategy, plan.has_aux, plan.reduction, plan.layout.sizes,
                 plan.layout.dim, plan.out_dim, plan.randomness, plan.buffer_policy,
                 plan.axis_name, plan.row_offset if keyed else 0,
                 plan.key_scope if keyed else None, plan.unused, torch.is_grad_enabled(),
                 torch.get_default_dtype(), treedef, tuple(parts))
    try:
        hash(signature)
    except TypeError:
        return leaves, tensors, treedef, None
    return leaves, tensors, treedef, signature


def _traced(fused: Fused, plan: GradPlan, leaves: list[Any], treedef: Any) -> _Graph:
    """The step's graph: ``fused`` on the plan, with every input tensor a graph input."""
    outputs: list[tuple[Any, tuple[Any, ...]]] = []

    def step(*inputs: torch.Tensor) -> list[torch.Tensor]:
        it = iter(inputs)
        merged = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        params, batch, args, buffers, key = _tree.unflatten(merged, treedef)
        result = fused(dataclasses.replace(plan, args=args, buffers=buffers, key=key), params,
                       batch)
        out, spec = _tree.flatten(result)
        constants = []
        for leaf in out:
            if not isinstance(leaf, (torch.Tensor, *_CONSTANT)):
                raise TypeError(f"the result holds a {type(leaf).__name__}")
            constants.append(_TENSOR if isinstance(leaf, torch.Tensor) else leaf)
        outputs.append((spec, tuple(constants)))
        return [leaf for leaf in out if isinstance(leaf, torch.Tensor)]

    module = trace(step, [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])
    spec, constants = outputs[-1]
    return _Graph(module, spec, constants)
