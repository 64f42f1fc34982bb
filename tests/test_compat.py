"""The private torch APIs behind ``fdp._compat`` still behave as fdp needs (a torch upgrade
that moves one fails here, by name)."""

from __future__ import annotations

import torch
from torch import nn

from fdp import _compat


def test_prefix_broadcasting():
    treedef = _compat.pytree.tree_structure(({"a": 1, "b": 2}, 3))
    assert _compat.broadcast_prefix_and_flatten((0, None), treedef) == [0, 0, None]
    assert _compat.broadcast_prefix_and_flatten((0, None, 1), treedef) is None


def test_functorch_transform_detection():
    seen = []

    def f(x):
        seen.append(_compat.in_functorch_transform())
        seen.append(_compat.is_functorch_wrapped(x))
        return x

    assert not _compat.in_functorch_transform()
    assert not _compat.is_functorch_wrapped(torch.ones(2))
    torch.func.vmap(f)(torch.ones(3, 2))
    torch.func.grad(lambda x: f(x).sum())(torch.ones(2))
    assert seen == [True, True, True, True]


def test_batchnorm_base_and_lazy_modules():
    for layer in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.SyncBatchNorm(3)):
        assert isinstance(layer, _compat.BatchNormBase)
    lazy = nn.LazyLinear(2)
    assert isinstance(lazy.weight, _compat.UninitializedTensorMixin)
    lazy(torch.ones(1, 3))
    assert not isinstance(lazy.weight, _compat.UninitializedTensorMixin)


def test_add_note():
    error = ValueError("boom")
    _compat.add_note(error, "where")
    assert "where" in (getattr(error, "__notes__", None) or [str(error)])[-1]
