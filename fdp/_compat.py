"""Every private torch API fdp relies on, in one place.

fdp declares the torch versions it is tested with (``pyproject.toml``). The names below are
not part of torch's public API, so a new torch release may move them; ``tests/test_compat.py``
checks each one's behaviour, so that such a change fails there, by name, rather than somewhere
deep inside a data-parallel step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as _torch_pytree  # torch has no public pytree module yet (2.13)
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

__all__ = [
    "BatchNormBase",
    "UninitializedTensorMixin",
    "add_note",
    "binding_namespaces",
    "broadcast_prefix_and_flatten",
    "compile_counter",
    "compiling",
    "functorch_kinds",
    "fx_can_name",
    "in_forward_ad",
    "in_functorch_transform",
    "is_functorch_wrapped",
    "pytree",
    "storage_use_count",
]


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+); on 3.10, which shows no notes, the note joins
    the message of an exception with one string argument."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    elif len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}",)


# --- pytrees without reference cycles -----------------------------------------------------------
# torch's tree_flatten (and what builds on it) recurses through a nested closure, which leaves a
# reference cycle (function <-> cell) per call: hundreds per data-parallel step, for the
# garbage collector. These versions recurse through module-level functions instead.

IsLeaf = Callable[[Any], bool] | None
TreeSpec = _torch_pytree.TreeSpec


def _flatten_into(node: Any, leaves: list[Any], is_leaf: IsLeaf) -> TreeSpec:
    if _torch_pytree.tree_is_leaf(node, is_leaf=is_leaf):
        leaves.append(node)
        return _torch_pytree._LEAF_SPEC
    node_type = _torch_pytree._get_node_type(node)
    children, context = _torch_pytree.SUPPORTED_NODES[node_type].flatten_fn(node)
    return TreeSpec(node_type, context, [_flatten_into(c, leaves, is_leaf) for c in children])


def tree_flatten(tree: Any, is_leaf: IsLeaf = None) -> tuple[list[Any], TreeSpec]:
    leaves: list[Any] = []
    return leaves, _flatten_into(tree, leaves, is_leaf)


def tree_structure(tree: Any, is_leaf: IsLeaf = None) -> TreeSpec:
    return tree_flatten(tree, is_leaf)[1]


def tree_flatten_with_path(tree: Any, is_leaf: IsLeaf = None
                           ) -> tuple[list[tuple[Any, Any]], TreeSpec]:
    pairs = list(_torch_pytree._generate_key_paths((), tree, is_leaf))
    return pairs, tree_structure(tree, is_leaf)


def tree_map(fn: Callable[..., Any], tree: Any, *rests: Any, is_leaf: IsLeaf = None) -> Any:
    """``fn`` over the leaves of trees of one structure (torch's ``tree_map`` for the rest)."""
    leaves, spec = tree_flatten(tree, is_leaf)
    columns = [leaves]
    for rest in rests:
        rest_leaves, rest_spec = tree_flatten(rest, is_leaf)
        if rest_spec != spec:  # a prefix or a mismatch: torch's rules and errors
            return _torch_pytree.tree_map(fn, tree, *rests, is_leaf=is_leaf)
        columns.append(rest_leaves)
    return _torch_pytree.tree_unflatten([fn(*xs) for xs in zip(*columns, strict=True)], spec)


class pytree:  # stands for the module it wraps
    """``torch.utils._pytree`` as fdp uses it, with the cycle-free versions above."""

    TreeSpec = _torch_pytree.TreeSpec
    keystr = staticmethod(_torch_pytree.keystr)
    tree_unflatten = staticmethod(_torch_pytree.tree_unflatten)
    tree_leaves = staticmethod(_torch_pytree.tree_leaves)  # an iterator: no closure
    tree_flatten = staticmethod(tree_flatten)
    tree_flatten_with_path = staticmethod(tree_flatten_with_path)
    tree_structure = staticmethod(tree_structure)
    tree_map = staticmethod(tree_map)


def broadcast_prefix_and_flatten(prefix: Any, tree: Any) -> list[Any] | None:
    """``prefix`` (a tree prefix of ``tree``) expanded to one value per leaf of ``tree``, or
    ``None`` when it is not a prefix (``jax.tree_util``'s prefix broadcasting)."""
    out: list[Any] = []
    return out if _broadcast_into(prefix, tree, out) else None


def _broadcast_into(prefix: Any, node: Any, out: list[Any]) -> bool:
    if _torch_pytree.tree_is_leaf(prefix):
        out.extend([prefix] * len(tree_flatten(node)[0]))
        return True
    if _torch_pytree.tree_is_leaf(node):
        return False
    if isinstance(prefix, dict) and isinstance(node, dict):  # any dict type, matched by key
        theirs, keys = _torch_pytree.SUPPORTED_NODES[_torch_pytree._get_node_type(node)
                                                     ].flatten_fn(node)
        if set(prefix) != set(node):
            return False
        keys = keys[1] if isinstance(node, defaultdict) else keys
        return all(_broadcast_into(prefix[k], n, out)
                   for k, n in zip(keys, theirs, strict=True))
    kind = _torch_pytree._get_node_type(prefix)
    if kind != _torch_pytree._get_node_type(node):
        return False
    flatten = _torch_pytree.SUPPORTED_NODES[kind].flatten_fn
    (mine, my_context), (theirs, their_context) = flatten(prefix), flatten(node)
    if len(mine) != len(theirs) or my_context != their_context:
        return False
    return all(_broadcast_into(p, n, out) for p, n in zip(mine, theirs, strict=True))


def compiling() -> bool:
    """Whether torch.compile or torch.export traces the caller, *in this thread*.

    ``torch.compiler.is_compiling()`` reads a process-wide flag that dynamo holds for the
    whole compile session (torch 2.13), so eager code in another thread (a threads-mesh
    replica, while a peer replica compiles) sees ``True`` too. Here: dynamo folds
    ``is_dynamo_compiling()`` to ``True`` in what it traces (this function is inlined there,
    so traced code never reaches the rest); eager code is traced only where this thread holds
    a tracing context (``torch.export(strict=False)``, code run by this thread's compiler).
    """
    return torch.compiler.is_dynamo_compiling() or (
        torch.compiler.is_compiling() and torch._guards.TracingContext.try_get() is not None)


# Dynamo must never compile this function as a frame of its own: compiled alone it is
# ``return True``, which an eager caller (a frame dynamo fell back from, whose callees dynamo
# still compiles one by one) would believe. Traced callers still inline it.
torch._dynamo.eval_frame.skip_code(compiling.__code__)


def storage_use_count(x: torch.Tensor) -> int:
    """How many holders share ``x``'s storage (c10's ``StorageImpl`` use count): one per tensor
    object (a view, a ``detach()`` alias, one a NumPy array or DLPack capsule keeps alive) and
    per ``UntypedStorage`` object, including the temporary one this call makes."""
    return int(torch._C._storage_Use_Count(x.untyped_storage()._cdata))


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (vmap, grad, jvp, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def in_forward_ad() -> bool:
    """Whether the caller runs inside a ``torch.func`` forward-mode transform (``jvp``,
    ``jacfwd``, ``hessian``, ``linearize``) in this thread."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def is_functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (batched or tracked by a transform), whose
    value cannot be read on the host."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


@torch._dynamo.assume_constant_result
def functorch_kinds() -> tuple[str, ...]:
    """The active ``torch.func`` transforms in this thread, outermost first (e.g.
    ``("Grad", "Vmap")``).

    Structural, so torch.compile reads it once while tracing (``assume_constant_result``: no
    guard, no graph break); traced code runs under the same transforms on every call.
    """
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return tuple(i.key().name for i in retrieve_all_functorch_interpreters())


def compile_counter() -> Any:
    """A torch.compile backend that counts the frames dynamo compiles (``.frame_count``) and
    runs their graphs as captured (``torch._dynamo.testing.CompileCounter``)."""
    from torch._dynamo.testing import CompileCounter

    return CompileCounter()


def binding_namespaces() -> tuple[Any, ...]:
    """Where torch's generated Python bindings of aten ops live, besides ``Tensor`` methods."""
    return (torch, torch._C._nn, torch._C._VariableFunctions)


def fx_can_name(fn: Callable[..., Any]) -> bool:
    """Whether ``torch.fx`` can write a call of ``fn`` into a graph's generated code."""
    from torch.fx.node import _get_qualified_name

    try:
        _get_qualified_name(fn)
    except Exception:
        return False
    return True
