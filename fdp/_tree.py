"""Pytree helpers shared by every fdp module.

Trees are whatever ``torch.utils._pytree`` understands: dicts, lists, tuples, NamedTuples and
``None``, with tensors (or other objects) as leaves. Leaves are addressed by *key path*, written as
strings such as ``params['fc.weight']`` so that errors can name the exact leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fdp._compat import broadcast_prefix_and_flatten, pytree

__all__ = [
    "allclose",
    "assert_allclose",
    "broadcast_prefix",
    "flatten",
    "keystr",
    "leaves_with_path",
    "map_with_path",
    "ravel",
    "stack",
    "unflatten",
    "unstack",
]

PyTree = Any
Params = dict[str, torch.Tensor]
"""Parameters or buffers: name -> tensor."""


def keystr(path: Sequence[Any], root: str = "") -> str:
    """Formats a key path as ``root['a'][0].b``."""
    return root + pytree.keystr(tuple(path))


def leaves_with_path(
    tree: PyTree, root: str = "", is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
    """Lists ``(key path string, leaf)`` pairs in flattening order."""
    pairs, _ = pytree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(keystr(path, root), leaf) for path, leaf in pairs]


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list, Any]:
    """Flattens a tree into ``(leaves, treedef)``."""
    return pytree.tree_flatten(tree, is_leaf=is_leaf)


def unflatten(leaves: Sequence[Any], treedef: Any) -> PyTree:
    """Inverse of :func:`flatten`."""
    return pytree.tree_unflatten(list(leaves), treedef)


def map_with_path(
    fn: Callable[..., Any],
    tree: PyTree,
    *rest: PyTree,
    root: str = "",
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """Maps ``fn(path_string, leaf, *other_leaves)`` over trees with the same key paths.

    Leaves of ``rest`` are matched to ``tree``'s by key path, not by position, so dicts whose
    keys were inserted in another order still line up. The result has ``tree``'s structure.
    """
    pairs, treedef = pytree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    keys = [keystr(path, root) for path, _ in pairs]
    others = [_aligned(other, keys, root, is_leaf, i + 1) for i, other in enumerate(rest)]
    out = [fn(key, leaf, *(o[j] for o in others))
           for j, (key, (_, leaf)) in enumerate(zip(keys, pairs, strict=True))]
    return pytree.tree_unflatten(out, treedef)


def _aligned(other: PyTree, keys: list[str], root: str, is_leaf: Any, index: int) -> list[Any]:
    by_path = dict(leaves_with_path(other, root, is_leaf))
    if by_path.keys() != set(keys):
        missing = sorted(set(keys) - by_path.keys())[:3]
        extra = sorted(by_path.keys() - set(keys))[:3]
        raise ValueError(f"tree {index} does not have the key paths of the first tree: "
                         f"missing {missing}, unexpected {extra}")
    return [by_path[k] for k in keys]


def broadcast_prefix(
    prefix: PyTree, tree: PyTree, what: str = "prefix", of: str = "arguments"
) -> list[Any]:
    """Expands ``prefix`` (a tree prefix of ``tree``, like JAX's in_axes) to one value per leaf.

    Raises:
        ValueError: if ``prefix`` is not a prefix of ``tree``'s structure.
    """
    flat = broadcast_prefix_and_flatten(prefix, tree)
    if flat is None:
        treedef = pytree.tree_structure(tree)
        raise ValueError(
            f"{what}={prefix!r} does not match the structure of the {of} {treedef}; "
            f"give a tree prefix of the {of}, e.g. one value per entry: {what}=(0, None)"
        )
    return flat


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: PyTree) -> PyTree:
    """``fn`` applied to every tensor leaf of ``tree``; other leaves stay as they are."""
    return map_with_path(lambda _, x: fn(x) if isinstance(x, torch.Tensor) else x, tree)


def cat(trees: Sequence[PyTree], dim: int) -> PyTree:
    """Trees of equal structure concatenated leaf by leaf along ``dim`` (a negative ``dim``
    counts from each leaf's end); non-tensor leaves are taken from the first tree."""
    if len(trees) == 1:
        return trees[0]
    flats = [flatten(t) for t in trees]
    columns = zip(*(f[0] for f in flats), strict=True)
    leaves = [torch.cat(col, dim % col[0].dim()) if isinstance(col[0], torch.Tensor) else col[0]
              for col in columns]
    return unflatten(leaves, flats[0][1])


def stack(trees: Sequence[PyTree], dim: int = 0) -> PyTree:
    """Stacks trees of equal structure leaf by leaf along a new axis ``dim``."""
    if len(trees) == 0:
        raise ValueError("stack: trees is empty; give at least one tree")
    for i, t in enumerate(trees):
        _require_tensors(t, f"trees[{i}]", "stack")
    flats = [pytree.tree_flatten(t) for t in trees]
    treedef = flats[0][1]
    for i, (_, d) in enumerate(flats):
        if d != treedef:
            raise ValueError(f"stack: trees[{i}] has structure {d}, trees[0] has {treedef}")
    leaves = [torch.stack(list(group), dim) for group in zip(*(f[0] for f in flats), strict=True)]
    return pytree.tree_unflatten(leaves, treedef)


def unstack(tree: PyTree, dim: int = 0) -> list[PyTree]:
    """Splits every leaf along ``dim`` and returns one tree per index (inverse of :func:`stack`)."""
    _require_tensors(tree, "tree", "unstack")
    leaves, treedef = pytree.tree_flatten(tree)
    if not leaves:
        raise ValueError("unstack: tree has no leaves")
    sizes = {leaf.shape[dim] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"unstack: leaves have different sizes {sorted(sizes)} at dim {dim}")
    parts = [leaf.unbind(dim) for leaf in leaves]
    return [pytree.tree_unflatten(list(p), treedef) for p in zip(*parts, strict=True)]


def _require_tensors(tree: PyTree, root: str, fn: str) -> None:
    for path, leaf in leaves_with_path(tree, root):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}: {path} is a {type(leaf).__name__}, not a torch.Tensor")


def ravel(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flattens a tree of tensors into one 1-D buffer (a communication "bucket").

    All leaves must share dtype and device. Returns the buffer and a function that maps a buffer
    of the same length back to a tree of views into it (no copy).

    Example:
        >>> flat, unravel = ravel({"a": torch.ones(2, 2), "b": torch.zeros(3)})
        >>> flat.shape
        torch.Size([7])
        >>> unravel(flat)["a"].shape
        torch.Size([2, 2])
    """
    _require_tensors(tree, "tree", "ravel")
    pairs = leaves_with_path(tree, "tree")
    if not pairs:
        raise ValueError("ravel: tree has no leaves")
    first_path, first = pairs[0]
    for path, leaf in pairs:
        if leaf.dtype != first.dtype or leaf.device != first.device:
            raise ValueError(
                f"ravel: {path} is {leaf.dtype} on {leaf.device} but {first_path} is "
                f"{first.dtype} on {first.device}; cast the tree to one dtype/device first"
            )
    leaves, treedef = pytree.tree_flatten(tree)
    shapes = [leaf.shape for leaf in leaves]
    numels = [leaf.numel() for leaf in leaves]
    flat = torch.cat([leaf.reshape(-1) for leaf in leaves])

    def unravel(buffer: torch.Tensor) -> PyTree:
        if buffer.shape != (sum(numels),):
            raise ValueError(f"unravel: buffer has shape {tuple(buffer.shape)}, "
                             f"expected ({sum(numels)},)")
        parts = buffer.split(numels)
        return pytree.tree_unflatten(
            [p.view(s) for p, s in zip(parts, shapes, strict=True)], treedef
        )

    return flat, unravel


def _first_mismatch(actual: PyTree, expected: PyTree, rtol: float, atol: float) -> str | None:
    a_leaves = dict(leaves_with_path(actual, "tree"))
    e_pairs = leaves_with_path(expected, "tree")
    if a_leaves.keys() != {p for p, _ in e_pairs}:
        missing = sorted({p for p, _ in e_pairs} - a_leaves.keys())[:3]
        extra = sorted(a_leaves.keys() - {p for p, _ in e_pairs})[:3]
        return f"structures differ: missing {missing}, unexpected {extra}"
    for where, e in e_pairs:
        a = a_leaves[where]
        if hasattr(a, "__array__") and not isinstance(a, torch.Tensor):
            a = torch.as_tensor(a)
        if hasattr(e, "__array__") and not isinstance(e, torch.Tensor):
            e = torch.as_tensor(e)
        if isinstance(a, torch.Tensor) != isinstance(e, torch.Tensor):
            return f"{where}: {type(a).__name__} vs {type(e).__name__}"
        if not isinstance(a, torch.Tensor):
            if a != e:
                return f"{where}: {a!r} != {e!r}"
            continue
        if a.shape != e.shape or a.dtype != e.dtype:
            return f"{where}: {a.dtype}{list(a.shape)} vs {e.dtype}{list(e.shape)}"
        a_, e_ = a.detach().cpu(), e.detach().cpu()
        if not torch.allclose(a_, e_, rtol=rtol, atol=atol, equal_nan=True):
            if a_.is_floating_point():
                diff = (a_ - e_).abs().max().item()
                rel = diff / max(e_.abs().max().item(), 1e-300)
                return f"{where}: max abs diff {diff:.3e}, relative {rel:.3e}"
            return f"{where}: values differ"
    return None


def allclose(actual: PyTree, expected: PyTree, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """True when both trees have the same structure, shapes, dtypes and close values."""
    return _first_mismatch(actual, expected, rtol, atol) is None


def assert_allclose(
    actual: PyTree, expected: PyTree, rtol: float = 1e-5, atol: float = 1e-8
) -> None:
    """Like :func:`allclose` but raises ``AssertionError`` naming the first mismatching leaf."""
    msg = _first_mismatch(actual, expected, rtol, atol)
    if msg is not None:
        raise AssertionError(f"trees differ (rtol={rtol}, atol={atol}): {msg}")
