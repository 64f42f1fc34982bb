"""Binding a replayed graph's aten ops to torch's Python bindings: the same kernels, called
the fast way.

``make_fx`` records ``torch.ops.aten.<op>.<overload>`` calls. Called from Python, such an
``OpOverload`` goes through the boxed calling convention (arguments parsed against the
schema into a stack): about 6 µs per call here, against 2.5 µs for ``Tensor.view`` or
``torch.mm``, whose generated bindings parse arguments directly. A replay of the bench's MLP
step runs 83 ops, so this was a large part of what the replay cost beyond the kernels.

:func:`bind_fast` replaces a node's target with a binding (``torch.<name>``, the same name in
torch's other namespaces of generated bindings, or the ``Tensor`` method) only where calling
that binding on the node's own fake arguments dispatches exactly the recorded overload and
nothing else (helpers of the fake tensors themselves, ``prim::`` ops, aside), on the same
tensors in the same order, and gives a result of the recorded shape, strides and dtype. The
kernel that runs is then the one the trace recorded, so a replay stays bitwise equal to the
eager step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from fdp._compat import binding_namespaces, fx_can_name, pytree

__all__ = ["bind_fast"]


class _Recorder(TorchDispatchMode):
    """Records the ops a call dispatches, then runs them (under the fake mode below it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.tensors: list[int] = []  # ids of the tensors the recorded call received

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func.namespace != "prim":
            self.seen.append(func)
            self.tensors = [id(x) for x in pytree.tree_leaves((args, kwargs or {}))
                            if isinstance(x, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def bind_fast(graph: fx.GraphModule) -> int:
    """Rebinds what it can (see the module docstring); returns how many nodes it rebound."""
    rebound: list[tuple[fx.Node, Any]] = []
    for node in graph.graph.nodes:
        binding = _binding(node)
        if binding is not None:
            rebound.append((node, node.target))
            node.target = binding
    if rebound:
        try:
            graph.recompile()
        except Exception:  # a binding fx cannot name in code: the recorded ops, as traced
            for node, op in rebound:
                node.target = op
            graph.recompile()
            return 0
    return len(rebound)


def _binding(node: fx.Node) -> Callable[..., Any] | None:
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) \
            or op.namespace != "aten" or op._schema.is_mutable:
        return None
    want = node.meta.get("val")
    # each graph node replaced by the fake tensor it was traced as
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    fakes = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mode = getattr(fakes[0], "fake_mode", None) if fakes else None
    if not isinstance(want, torch.Tensor) or mode is None:
        return None
    for candidate in _candidates(op):
        if not fx_can_name(candidate):
            continue
        recorder = _Recorder()
        try:
            with mode, recorder:
                got = candidate(*args, **kwargs)
        except Exception:  # not this binding's signature: try the next one
            continue
        if recorder.seen == [op] and recorder.tensors == [id(x) for x in fakes] \
                and isinstance(got, torch.Tensor) \
                and (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(),
                                                             want.dtype):
            return candidate
    return None


def _candidates(op: torch._ops.OpOverload) -> Iterator[Callable[..., Any]]:
    name = op._schema.name.split("::", 1)[1]
    for namespace in binding_namespaces():
        found = getattr(namespace, name, None)
        if callable(found):
            yield found
    method = getattr(torch.Tensor, name, None)
    if callable(method):
        yield method
