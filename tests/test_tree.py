"""fdp.tree helpers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fdp


class Pair(NamedTuple):
    a: torch.Tensor
    b: list


@st.composite
def trees(draw):
    n = draw(st.integers(1, 4))
    return {f"k{i}": Pair(torch.randn(draw(st.integers(0, 3)), 2), [torch.randn(3)])
            for i in range(n)}


@given(tree=trees())
def test_ravel_roundtrip_and_views(tree):
    flat, unravel = fdp.tree.ravel(tree)
    assert flat.dim() == 1
    back = unravel(flat)
    fdp.tree.assert_allclose(back, tree, rtol=0, atol=0)
    first = fdp.tree.flatten(back)[0][0]
    if first.numel():
        assert first.data_ptr() == flat.data_ptr()  # views into the bucket


@given(tree=trees(), k=st.integers(1, 4))
def test_stack_unstack(tree, k):
    stacked = fdp.tree.stack([tree] * k)
    parts = fdp.tree.unstack(stacked)
    assert len(parts) == k
    for part in parts:
        fdp.tree.assert_allclose(part, tree, rtol=0, atol=0)


def test_assert_allclose_names_the_first_mismatch():
    a = {"x": {"y": torch.ones(2)}, "z": torch.zeros(1)}
    b = {"x": {"y": torch.tensor([1.0, 2.0])}, "z": torch.zeros(1)}
    with pytest.raises(AssertionError, match=r"tree\['x'\]\['y'\]"):
        fdp.tree.assert_allclose(a, b)
    with pytest.raises(AssertionError, match="structures differ"):
        fdp.tree.assert_allclose(a, {"x": a["x"]})
    with pytest.raises(AssertionError, match="float32"):
        fdp.tree.assert_allclose({"v": torch.ones(2)}, {"v": torch.ones(2, dtype=torch.float64)})
    assert fdp.tree.allclose(a, a) and not fdp.tree.allclose(a, b)


def test_map_with_path_and_keystr():
    tree = {"a": [torch.ones(1), torch.zeros(1)]}
    paths = fdp.tree.map_with_path(lambda p, x: p, tree, root="t")
    assert paths == {"a": ["t['a'][0]", "t['a'][1]"]}
    with pytest.raises(ValueError, match=r"missing \[\"\['a'\]\[1\]\"\]"):
        fdp.tree.map_with_path(lambda p, x, y: x, tree, {"a": [1]})


def test_trees_are_matched_by_key_path_not_insertion_order():
    a = {"x": torch.ones(1), "y": torch.zeros(2)}
    b = {"y": torch.zeros(2), "x": torch.ones(1)}
    assert fdp.tree.allclose(a, b)
    summed = fdp.tree.map_with_path(lambda p, u, v: u + v, a, b)
    assert list(summed) == ["x", "y"] and torch.equal(summed["y"], torch.zeros(2))
    assert fdp.tree.allclose({"n": np.ones(2)}, {"n": np.ones(2)})
    assert not fdp.tree.allclose({"n": np.ones(2)}, {"n": np.zeros(2)})


def test_stack_and_unstack_name_non_tensor_leaves():
    with pytest.raises(TypeError, match=r"trees\[1\]\['a'\] is a int"):
        fdp.tree.stack([{"a": torch.ones(1)}, {"a": 3}])
    with pytest.raises(TypeError, match=r"tree\['a'\] is a str"):
        fdp.tree.unstack({"a": "s"})


def test_ravel_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match=r"tree\['b'\] is torch.float64"):
        fdp.tree.ravel({"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)})
