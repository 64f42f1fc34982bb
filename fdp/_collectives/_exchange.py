"""Collectives that move parts of values between replicas: ``psum_scatter``, ``all_to_all``,
``ppermute`` and ``pshuffle`` (JAX's ``lax`` spellings and semantics).

Each is written with :func:`fdp.psum` or :func:`fdp.all_gather` and an index selection by
:func:`fdp.axis_index`, so it runs on every backend, over a tuple of axis names too, and its
gradient is the transpose JAX defines (``psum_scatter``'s is ``all_gather``, ``ppermute``'s is
the inverse permutation) by autograd through those parts. The data each replica receives is
exact; the exchange moves whole values (an all-gather), not only the parts that travel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fdp import _check
from fdp._collectives._named import AxisName, all_gather, axis_index, axis_names, axis_size, psum
from fdp._collectives._rules import tree_collective

__all__ = ["all_to_all", "ppermute", "pshuffle", "psum_scatter"]


def psum_scatter(x: Any, axis_name: AxisName, *, scatter_dimension: int = 0,
                 tiled: bool = False, axis_index_groups: Any = None) -> Any:
    """The sum over the replicas, of which each replica keeps one part (a reduce-scatter).

    Without ``tiled`` the value's ``scatter_dimension`` must have the axis size N and replica
    ``i`` gets entry ``i`` of the sum along it (the dimension disappears); with ``tiled`` it
    must be divisible by N and replica ``i`` gets the ``i``-th of N equal blocks. The
    transpose is :func:`fdp.all_gather`.

    Example:
        >>> mesh = fdp.Mesh(2)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # replica i holds row i
        >>> fdp.pmap(lambda v: fdp.psum_scatter(v, "dp"), mesh)(x)
        tensor([4., 6.])
    """
    fn = "psum_scatter"
    _no_groups(axis_index_groups, fn)
    names = axis_names(axis_name, fn)
    _check.integer(scatter_dimension, fn, "scatter_dimension")
    n = axis_size(names)

    def leaf_op(v: torch.Tensor) -> torch.Tensor:
        d = _dim(scatter_dimension, v, fn, "scatter_dimension")
        _check_split(v, d, n, tiled, fn, "scatter_dimension")
        total = psum(v, names)
        if tiled:
            total = total.unflatten(d, (n, v.shape[d] // n))
        return _select(total, d, axis_index(names))

    return tree_collective(x, fn, leaf_op)


def all_to_all(x: Any, axis_name: AxisName, split_axis: int, concat_axis: int, *,
               tiled: bool = False, axis_index_groups: Any = None) -> Any:
    """Replica ``i`` receives part ``i`` (along ``split_axis``) of every replica's value,
    stacked (or, with ``tiled``, concatenated) in replica order along ``concat_axis``.

    Without ``tiled``, ``split_axis`` must have the axis size N; it disappears and a new axis
    of size N appears at ``concat_axis`` (counted in the result). With ``tiled`` it must be
    divisible by N, and the parts are concatenated along the existing ``concat_axis``.

    Example:
        >>> mesh = fdp.Mesh(2)
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # replica i holds row i
        >>> fdp.pmap(lambda v: fdp.all_to_all(v, "dp", 0, 0), mesh)(x)
        tensor([[0., 2.],
                [1., 3.]])
    """
    fn = "all_to_all"
    _no_groups(axis_index_groups, fn)
    names = axis_names(axis_name, fn)
    _check.integer(split_axis, fn, "split_axis")
    _check.integer(concat_axis, fn, "concat_axis")
    n = axis_size(names)

    def leaf_op(v: torch.Tensor) -> torch.Tensor:
        s = _dim(split_axis, v, fn, "split_axis")
        c = _dim(concat_axis, v, fn, "concat_axis")
        _check_split(v, s, n, tiled, fn, "split_axis")
        everyone = all_gather(v, names)  # [source, ...v]
        if tiled:
            everyone = everyone.unflatten(s + 1, (n, v.shape[s] // n))
        mine = _select(everyone, s + 1, axis_index(names))  # [source, ...]
        out = mine.movedim(0, c)
        return out.flatten(c, c + 1) if tiled else out

    return tree_collective(x, fn, leaf_op)


def ppermute(x: Any, axis_name: AxisName, perm: Sequence[Sequence[int]]) -> Any:
    """Sends each replica's value to another: ``perm`` lists ``(source, destination)`` pairs.

    A replica that is no pair's destination gets zeros (as in JAX). Each source and each
    destination may appear once. The transpose is ``ppermute`` with the pairs reversed.

    Example:
        >>> mesh = fdp.Mesh(3)
        >>> shift = [(0, 1), (1, 2), (2, 0)]
        >>> fdp.pmap(lambda v: fdp.ppermute(v, "dp", shift), mesh)(torch.tensor([1., 2., 3.]))
        tensor([3., 1., 2.])
    """
    fn = "ppermute"
    names = axis_names(axis_name, fn)
    source = _sources(perm, axis_size(names), fn)

    def leaf_op(v: torch.Tensor) -> torch.Tensor:
        me = axis_index(names)
        src = torch.tensor([max(s, 0) for s in source], device=v.device)
        has = torch.tensor([s >= 0 for s in source], device=v.device)
        got = _select(all_gather(v, names), 0, _select(src, 0, me))
        return torch.where(_select(has, 0, me), got, torch.zeros_like(got))

    return tree_collective(x, fn, leaf_op)


def pshuffle(x: Any, axis_name: AxisName, perm: Sequence[int]) -> Any:
    """Replica ``i`` gets the value of replica ``perm[i]`` (``perm``: a permutation of
    ``0..N-1``).

    Example:
        >>> mesh = fdp.Mesh(3)
        >>> fdp.pmap(lambda v: fdp.pshuffle(v, "dp", [2, 0, 1]), mesh)(torch.tensor([1., 2., 3.]))
        tensor([3., 1., 2.])
    """
    fn = "pshuffle"
    n = axis_size(axis_names(axis_name, fn))
    if isinstance(perm, (str, bytes)) or not isinstance(perm, Sequence) \
            or sorted(_ints(perm, fn, "perm")) != list(range(n)):
        raise ValueError(f"{fn}: perm={perm!r} must be a permutation of 0..{n - 1} (replica i "
                         f"gets the value of replica perm[i])")
    return ppermute(x, axis_name, [(src, dst) for dst, src in enumerate(perm)])


def _no_groups(groups: Any, fn: str) -> None:
    if groups is not None:
        raise ValueError(f"{fn}: axis_index_groups is not supported (fdp.psum, pmean, pmax, "
                         f"pmin and all_gather take it); run {fn} over a mesh axis of the group "
                         f"size instead (a nested pmap), or combine all_gather(..., "
                         f"axis_index_groups=...) with indexing")


def _sources(perm: Any, n: int, fn: str) -> list[int]:
    """For each destination, its source (-1: none)."""
    if isinstance(perm, (str, bytes)) or not isinstance(perm, Sequence):
        raise TypeError(f"{fn}: perm must be a list of (source, destination) pairs, got "
                        f"{type(perm).__name__}")
    source = [-1] * n
    seen: set[int] = set()
    for k, pair in enumerate(perm):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{fn}: perm[{k}]={pair!r} is not a (source, destination) pair")
        src, dst = _ints(pair, fn, f"perm[{k}]")
        if not (0 <= src < n and 0 <= dst < n):
            raise ValueError(f"{fn}: perm[{k}]={tuple(pair)!r} names a replica outside "
                             f"0..{n - 1}")
        if src in seen or source[dst] >= 0:
            raise ValueError(f"{fn}: perm[{k}]={tuple(pair)!r} repeats a source or a "
                             f"destination; each replica sends and receives at most once")
        seen.add(src)
        source[dst] = src
    return source


def _ints(values: Sequence[Any], fn: str, what: str) -> list[int]:
    if not all(_check.is_int(v) for v in values):
        raise TypeError(f"{fn}: {what}={list(values)!r} must hold ints (replica indices)")
    return [int(v) for v in values]


def _dim(dim: int, v: torch.Tensor, fn: str, arg: str) -> int:
    if not -max(v.dim(), 1) <= dim < max(v.dim(), 1) or v.dim() == 0:
        raise ValueError(f"{fn}: {arg}={dim} is out of range for a value with {v.dim()} dims")
    return dim % v.dim()


def _check_split(v: torch.Tensor, d: int, n: int, tiled: bool, fn: str, arg: str) -> None:
    size = v.shape[d]
    if tiled and size % n:
        raise ValueError(f"{fn}: with tiled=True, dimension {arg}={d} (size {size}) must be "
                         f"divisible by the axis size {n}")
    if not tiled and size != n:
        raise ValueError(f"{fn}: dimension {arg}={d} has size {size}, but without tiled it "
                         f"must equal the axis size {n} (use tiled=True to split it into "
                         f"{n} blocks)")


def _select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Entry ``index`` (a 0-d tensor, batched on the vmap backend) of ``x`` along ``dim``."""
    return x.index_select(dim, index.reshape(1).to(x.device)).squeeze(dim)
