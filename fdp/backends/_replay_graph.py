"""One data-parallel step as an aten graph: traced once with fake tensors, simplified, replayed.

:func:`trace` runs a function of a flat list of tensors under ``make_fx`` with fake tensors,
which records every aten op the eager run would execute (the vmapped forward with its
batching rules applied, and the backward of ``torch.autograd.grad`` written out), without
computing anything. Fake tensors have no values, so a function that reads one on the host
(``.item()``, an ``if`` on a tensor) cannot be traced: :func:`trace` raises, and the caller
runs the function eagerly instead.

:func:`simplify` drops what is a no-op in a replay under ``torch.no_grad``: ``detach`` and
multiplication by an integer 1 (torch's vmap rule for a shared ``Linear`` bias writes
``bias * 1``). Both give bitwise the tensors they replace, so a replay computes bitwise what
the eager run computes: the same kernels on the same inputs, in the same order.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["UnreplayableError", "random_ops", "simplify", "trace"]

_aten = torch.ops.aten


class UnreplayableError(Exception):
    """The function cannot be traced into a replayable graph (the reason is the message)."""


def trace(fn: Callable[..., list[torch.Tensor]], leaves: Sequence[torch.Tensor]
          ) -> fx.GraphModule:
    """``fn(*leaves)``'s aten graph, traced with fake tensors (nothing is computed).

    Tensors that ``fn`` reads from its closure (a module's buffers) become constants of the
    graph: the same tensor objects, so in-place updates of them are seen by the replay.
    """
    graph = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*leaves)
    return simplify(graph)


def random_ops(graph: fx.GraphModule) -> list[str]:
    """The names of the ops in ``graph`` that draw from torch's random generators."""
    return sorted({str(node.target) for node in graph.graph.nodes
                   if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                   and torch.Tag.nondeterministic_seeded in node.target.tags})


def simplify(graph: fx.GraphModule) -> fx.GraphModule:
    """Removes the nodes that give bitwise their input under ``torch.no_grad`` (none in a
    graph that writes in place: a removed copy could then see a later write)."""
    if any(_mutates(node) for node in graph.graph.nodes):
        return graph
    changed = False
    for node in list(graph.graph.nodes):
        source = _identity_source(node)
        if source is not None and _may_forward(node, source):
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
            changed = True
    if changed:
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return graph



def _mutates(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or target is operator.getitem:
        return False
    return not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable


def _identity_source(node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` reproduces bitwise (``detach(x)``, ``x * 1``), if any."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    if node.target is _aten.detach.default:
        return source
    if node.target is _aten.mul.Scalar and len(node.args) == 2 and not node.kwargs \
            and type(node.args[1]) is int and node.args[1] == 1:
        mine, theirs = node.meta.get("val"), source.meta.get("val")
        if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) \
                and mine.dtype == theirs.dtype and mine.shape == theirs.shape:
            return source
    return None


def _may_forward(node: fx.Node, source: fx.Node) -> bool:
    """Whether uses of ``node`` may read ``source`` instead: always for ops inside the graph;
    for the graph's outputs only when ``source`` is a fresh tensor (not an input or a view)
    that nothing else reads, so that no output is an input's or another output's tensor."""
    if all(user.op != "output" for user in node.users):
        return True
    target = source.target
    return source.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
        and not target.is_view and len(source.users) == 1
