"""Hypothesis strategies for data-parallel property tests (imported by ``fdp.testing.strategies``).

Everything is drawn from small integers (sizes, seeds), so failing examples shrink to small
meshes, small batches and seed 0. Tensor values come from a drawn seed through a private
``torch.Generator`` or a forked RNG: torch's global RNG is never touched.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st
from torch import nn

from fdp import _check
from fdp._layout import split_sizes
from fdp._mesh import Mesh
from fdp.backends import cpu_backends
from fdp.backends._options import SplitRule
from fdp.testing._models import CaseSpec, ModelCase, build_case

__all__ = ["MeshBatch", "mesh_batches", "meshes", "model_cases", "models", "pytrees", "splits"]

BACKENDS = tuple(cpu_backends())
SPLIT_KINDS = ("chunk", "even", "explicit")
MODEL_KINDS = ("mlp", "cnn", "kwargs")
_DTYPES = (torch.float64, torch.float32)


def _check_choices(values: Sequence[str], allowed: tuple[str, ...], name: str) -> tuple:
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"{name} must be a non-empty selection of {allowed}, got {values!r}")
    return values


def _check_range(low: int, high: int, name: str, minimum: int) -> None:
    if not (_check.is_int(low) and _check.is_int(high)):
        raise TypeError(f"{name}: bounds must be ints, got {low!r} and {high!r}")
    if not minimum <= low <= high:
        raise ValueError(f"{name}: need {minimum} <= min <= max, got {low} and {high}")


def _mesh(n: int, backend: str) -> Mesh:
    return Mesh.from_backend(cpu_backends()[backend](n))


def meshes(min_size: int = 1, max_size: int = 8, *,
           backends: Sequence[str] = ("vmap",)) -> st.SearchStrategy[Mesh]:
    """Meshes of ``min_size`` to ``max_size`` replicas; shrinks towards ``min_size``.

    Args:
        min_size, max_size: the range of ``mesh.size``.
        backends: ``"vmap"`` (``fdp.Mesh(n)``, the default) and/or ``"threads"``
            (``fdp.Mesh(devices=["cpu"] * n)``, one thread per replica).

    Example:
        >>> from hypothesis import given, settings
        >>> from fdp.testing import strategies as fst
        >>> @settings(max_examples=5)
        ... @given(fst.meshes(1, 4))
        ... def check(mesh):
        ...     assert 1 <= mesh.size <= 4
        >>> check()
    """
    _check_range(min_size, max_size, "meshes", 1)
    kinds = _check_choices(backends, BACKENDS, "backends")
    return st.builds(_mesh, st.integers(min_size, max_size), st.sampled_from(kinds))


@st.composite
def _explicit(draw: st.DrawFn, batch_size: int, n: int) -> list[int]:
    cuts = sorted(draw(st.lists(st.integers(0, batch_size), min_size=n - 1, max_size=n - 1)))
    return [b - a for a, b in itertools.pairwise([0, *cuts, batch_size])]


def splits(batch_size: int, n: int,
           kinds: Sequence[str] = SPLIT_KINDS) -> st.SearchStrategy[SplitRule]:
    """Split rules for ``batch_size`` rows over ``n`` replicas.

    ``"chunk"``, ``"even"``, or (``"explicit"``) a list of ``n`` row counts that sum to
    ``batch_size``, zeros allowed.

    Example:
        >>> from hypothesis import given, settings
        >>> from fdp.testing import strategies as fst
        >>> @settings(max_examples=5)
        ... @given(fst.splits(5, 3, kinds=["explicit"]))
        ... def check(rule):
        ...     assert len(rule) == 3 and sum(rule) == 5
        >>> check()
    """
    _check_range(1, n, "splits", 1)
    kinds = _check_choices(kinds, SPLIT_KINDS, "kinds")
    options = [st.just(k) for k in kinds if k != "explicit"]
    if "explicit" in kinds:
        options.append(_explicit(batch_size, n))
    return st.one_of(options)


class MeshBatch(NamedTuple):
    """A mesh, a batch size and a split rule drawn together (see :func:`mesh_batches`)."""

    mesh: Mesh
    batch_size: int
    split: SplitRule

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows per replica."""
        return split_sizes(self.batch_size, self.mesh.size, self.split)


@st.composite
def _mesh_batches(draw: st.DrawFn, sizes: tuple[int, int], batch: tuple[int, int],
                  kinds: tuple, divisible: bool, backends: tuple) -> MeshBatch:
    mesh = draw(meshes(*sizes, backends=backends))
    n = mesh.size
    if divisible:
        rows = n * draw(st.integers(max(1, -(-batch[0] // n)), max(1, batch[1] // n)))
    else:
        rows = draw(st.integers(*batch))
    return MeshBatch(mesh, rows, draw(splits(rows, n, kinds)))


def mesh_batches(min_size: int = 1, max_size: int = 8, *, min_batch: int = 1,
                 max_batch: int = 24, kinds: Sequence[str] = SPLIT_KINDS,
                 divisible: bool = False,
                 backends: Sequence[str] = ("vmap",)) -> st.SearchStrategy[MeshBatch]:
    """``MeshBatch(mesh, batch_size, split)``: batch sizes that are often uneven on the mesh.

    Args:
        min_size, max_size: the range of the mesh size.
        min_batch, max_batch: the range of the batch size (any relation to the mesh size:
            fewer rows than replicas, remainders, and with ``"explicit"`` zero-row replicas).
        kinds: the split rules to draw from (see :func:`splits`).
        divisible: only batch sizes that are multiples of the mesh size (then ``"chunk"`` and
            ``"even"`` give equal shards, as ``buffer_policy="sync"`` on the vmap backend
            needs); at least one row per replica.
        backends: as for :func:`meshes`.

    Example:
        >>> from hypothesis import given, settings
        >>> from fdp.testing import strategies as fst
        >>> @settings(max_examples=5)
        ... @given(fst.mesh_batches(max_size=4, max_batch=10))
        ... def check(mb):
        ...     assert sum(mb.sizes) == mb.batch_size and len(mb.sizes) == mb.mesh.size
        >>> check()
    """
    _check_range(min_size, max_size, "mesh_batches", 1)
    _check_range(min_batch, max_batch, "mesh_batches", 1)
    if divisible and max_batch < min_size:
        raise ValueError(f"mesh_batches: divisible=True needs max_batch >= min_size "
                         f"({max_batch} < {min_size})")
    return _mesh_batches((min_size, max_size), (min_batch, max_batch),
                         _check_choices(kinds, SPLIT_KINDS, "kinds"), divisible,
                         _check_choices(backends, BACKENDS, "backends"))


class _Leaf(NamedTuple):
    shape: tuple[int, ...]


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(st.sampled_from("abcde"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
    )


def _fill(skeleton: Any, batch_size: int, dtype: torch.dtype, generator: torch.Generator) -> Any:
    if isinstance(skeleton, _Leaf):
        return torch.randn((batch_size, *skeleton.shape), dtype=dtype, generator=generator)
    if isinstance(skeleton, dict):
        return {k: _fill(v, batch_size, dtype, generator) for k, v in skeleton.items()}
    children = [_fill(v, batch_size, dtype, generator) for v in skeleton]
    return tuple(children) if isinstance(skeleton, tuple) else children


@st.composite
def _pytrees(draw: st.DrawFn, batch_size: int, dtypes: tuple, max_leaves: int,
             max_feature_dims: int, max_feature_size: int) -> Any:
    shapes = st.lists(st.integers(1, max_feature_size), max_size=max_feature_dims)
    leaf = shapes.map(lambda s: _Leaf(tuple(s)))
    skeleton = draw(st.recursive(leaf, _containers, max_leaves=max_leaves))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return _fill(skeleton, batch_size, dtype, generator)


def pytrees(batch_size: int, *, dtypes: Sequence[torch.dtype] = _DTYPES, max_leaves: int = 4,
            max_feature_dims: int = 2, max_feature_size: int = 3) -> st.SearchStrategy[Any]:
    """Nested dicts, lists and tuples of tensors that share a leading batch size.

    Every leaf has shape ``[batch_size, *features]`` with up to ``max_feature_dims`` feature
    dimensions of size 1 to ``max_feature_size``; all leaves of one tree share a dtype drawn
    from ``dtypes``; the values are standard normal, from a drawn seed. A tree may be a single
    tensor.

    Example:
        >>> from hypothesis import given, settings
        >>> from fdp.testing import strategies as fst
        >>> @settings(max_examples=5)
        ... @given(fst.pytrees(5, dtypes=[torch.float64]))
        ... def check(tree):
        ...     for leaf in fdp.tree.flatten(tree)[0]:
        ...         assert leaf.shape[0] == 5 and leaf.dtype == torch.float64
        >>> check()
    """
    _check_range(1, batch_size, "pytrees", 0)
    _check_range(1, max_leaves, "pytrees", 1)
    dtypes = _check_dtypes(dtypes)
    return _pytrees(batch_size, dtypes, max_leaves, max_feature_dims, max_feature_size)


def _check_dtypes(dtypes: Sequence[torch.dtype]) -> tuple[torch.dtype, ...]:
    dtypes = tuple(dtypes)
    if not dtypes or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise ValueError(f"dtypes must be a non-empty sequence of floating-point torch dtypes, "
                         f"got {dtypes!r}")
    return dtypes


def _flag(value: bool | None) -> st.SearchStrategy[bool]:
    return st.booleans() if value is None else st.just(bool(value))


def model_cases(kinds: Sequence[str] = MODEL_KINDS, *, batch_size: int | None = None,
                dtypes: Sequence[torch.dtype] = _DTYPES, batchnorm: bool | None = False,
                dropout: bool | None = False,
                training: bool | None = True) -> st.SearchStrategy[ModelCase]:
    """A small model with a batch, a loss and ``inputs``: a :class:`ModelCase`.

    Pass a case to :func:`fdp.testing.assert_dp_equivalent` as
    ``assert_dp_equivalent(case.module, case.loss_fn, case.batch, inputs=case.inputs)``.

    Args:
        kinds: ``"mlp"`` (input ``[B, 4]``), ``"cnn"`` (``[B, 1, 4, 4]``) and/or ``"kwargs"``
            (a nested input and keyword arguments ``scale`` and ``mask``); all output
            ``[B, 3]`` (:class:`fdp.testing.MLP`, :class:`~fdp.testing.SmallCNN`,
            :class:`~fdp.testing.KwargsNet`).
        batch_size: rows in the batch; None draws 1 to 16.
        dtypes: the model's and batch's dtype is drawn from these.
        batchnorm: with a BatchNorm layer at ``"body.bn"`` (True), without (False), or
            either (None). Its running statistics are random, so eval mode is not trivial.
        dropout: with a Dropout(0.5) layer at ``"body.drop"``, without, or either.
        training: the module's mode (True: train, False: eval, None: either).

    Example:
        >>> from hypothesis import given, settings
        >>> from fdp.testing import strategies as fst
        >>> @settings(max_examples=3)
        ... @given(fst.model_cases(["mlp", "cnn"], batch_size=6))
        ... def check(case):
        ...     assert case.module(case.inputs(case.batch)).shape == (6, 3)
        >>> check()
    """
    kinds = _check_choices(kinds, MODEL_KINDS, "kinds")
    if batch_size is not None:
        _check_range(1, batch_size, "model_cases", 1)
    rows = st.integers(1, 16) if batch_size is None else st.just(batch_size)
    specs = st.builds(
        CaseSpec, kind=st.sampled_from(kinds), batch_size=rows, seed=st.integers(0, 2**16),
        hidden=st.integers(1, 4), dtype=st.sampled_from(_check_dtypes(dtypes)),
        batchnorm=_flag(batchnorm), dropout=_flag(dropout).map(lambda d: 0.5 if d else 0.0),
        training=_flag(training), loss=st.sampled_from(["mse", "cross_entropy"]),
        container=st.sampled_from(["tuple", "dict"]))
    return specs.map(build_case)


def models(kinds: Sequence[str] = MODEL_KINDS, *, dtypes: Sequence[torch.dtype] = _DTYPES,
           batchnorm: bool | None = False, dropout: bool | None = False,
           training: bool | None = True) -> st.SearchStrategy[nn.Module]:
    """Just the modules of :func:`model_cases` (same arguments, input shapes listed there).

    Example:
        >>> from hypothesis import given, settings
        >>> from fdp.testing import strategies as fst
        >>> @settings(max_examples=3)
        ... @given(fst.models(["cnn"], dtypes=[torch.float32]))
        ... def check(net):
        ...     assert net(torch.randn(2, 1, 4, 4)).shape == (2, 3)
        >>> check()
    """
    return model_cases(kinds, dtypes=dtypes, batchnorm=batchnorm, dropout=dropout,
                       training=training).map(lambda case: case.module)
