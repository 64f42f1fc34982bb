"""Laws of the primitives outside pmap: scatter/gather, replicate/unreplicate, all_reduce."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fdp
from fdp._layout import split_sizes
from tests.helpers import F64_REL, assert_close, batch_sizes, mesh_sizes, splits


@st.composite
def batches(draw, b, dim=0):
    """A nested batch: every tensor has ``b`` rows at ``dim``; plus a broadcast leaf."""
    extra = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    shape = list(extra)
    shape.insert(min(dim, len(shape)), b)
    return {"x": torch.randn(*shape, dtype=torch.float64),
            "pair": (torch.arange(b), torch.randn(*shape) > 0),
            "tag": "broadcast"}


@given(n=mesh_sizes, b=batch_sizes, data=st.data())
def test_gather_scatter_roundtrip(n, b, data):
    mesh = fdp.Mesh(n)
    batch = data.draw(batches(b))
    split = data.draw(splits(b, n))
    sharded = fdp.scatter(batch, mesh, split=split)
    assert sharded.layout.total == b and len(sharded.layout.sizes) == n
    assert sharded.data["tag"] == "broadcast"
    assert sharded.data["x"].shape[:2] == (n, sharded.layout.max_size)
    back = fdp.gather(sharded, mesh)
    fdp.tree.assert_allclose(back, batch, rtol=0, atol=0)


@given(n=mesh_sizes, b=st.integers(1, 12), dim=st.integers(0, 2), data=st.data())
def test_gather_scatter_roundtrip_any_dim(n, b, dim, data):
    mesh = fdp.Mesh(n)
    shape = [2, 3, 2]
    shape[dim] = b
    x = torch.randn(*shape)
    sharded = fdp.scatter(x, mesh, dim=dim, split=data.draw(splits(b, n)))
    assert torch.equal(fdp.gather(sharded, mesh), x)  # defaults to the scatter dim
    assert torch.equal(fdp.gather(sharded, mesh, dim=dim), x)
    assert torch.equal(fdp.gather(fdp.scatter(x, mesh, dim=dim - 3), mesh), x)


@given(n=mesh_sizes, b=batch_sizes, data=st.data())
def test_shards_hold_the_right_rows_and_mask(n, b, data):
    mesh = fdp.Mesh(n)
    x = torch.arange(b)
    sharded = fdp.scatter(x, mesh, split=data.draw(splits(b, n)))
    layout = sharded.layout
    assert sharded.counts.tolist() == list(layout.sizes)
    assert sharded.mask.sum(1).tolist() == list(layout.sizes)
    for i, (off, size) in enumerate(zip(layout.offsets, layout.sizes, strict=True)):
        assert sharded.data[i][:size].tolist() == list(range(off, off + size))
        assert sharded.mask[i][:size].all() and not sharded.mask[i][size:].any()


@given(b=st.integers(1, 100), n=st.integers(1, 16))
def test_chunk_rule_is_torch_chunk(b, n):
    expected = [len(c) for c in torch.arange(b).chunk(n)]
    sizes = split_sizes(b, n, "chunk")
    assert list(sizes[: len(expected)]) == expected
    assert all(s == 0 for s in sizes[len(expected):]) and len(sizes) == n


@given(b=st.integers(1, 100), n=st.integers(1, 16))
def test_even_rule(b, n):
    sizes = split_sizes(b, n, "even")
    assert sum(sizes) == b and max(sizes) - min(sizes) <= 1


def test_even_split_is_a_view_and_replicate_is_zero_copy():
    mesh = fdp.Mesh(4)
    x = torch.randn(8, 3)
    assert fdp.scatter(x, mesh).data.data_ptr() == x.data_ptr()
    rep = fdp.replicate(x, mesh)
    assert rep.data_ptr() == x.data_ptr() and rep.stride(0) == 0


def test_padding_repeats_real_rows():
    """Padded slots hold real data (no zeros that could produce inf/NaN in a loss)."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    sharded = fdp.scatter(x, fdp.Mesh(4), split=[3, 1, 1, 0])
    assert sharded.data.tolist() == [[1, 2, 3], [4, 4, 4], [5, 5, 5], [1, 1, 1]]


@given(n=mesh_sizes, data=st.data())
def test_replicate_unreplicate(n, data):
    mesh = fdp.Mesh(n)
    tree = {"w": torch.randn(3, 2), "b": [torch.randn(2), None]}
    reps = fdp.replicate(tree, mesh)
    assert reps["w"].shape == (n, 3, 2) and reps["b"][1] is None
    fdp.tree.assert_allclose(fdp.unreplicate(reps, mesh), tree, rtol=0, atol=0)


@given(n=mesh_sizes, op=st.sampled_from(["sum", "mean", "max", "min"]))
def test_all_reduce_matches_reference(n, op):
    mesh = fdp.Mesh(n)
    x = torch.randn(n, 4, 2, dtype=torch.float64)
    out = fdp.all_reduce({"x": x}, mesh, op)["x"]
    ref = {"sum": x.sum(0), "mean": x.mean(0), "max": x.amax(0), "min": x.amin(0)}[op]
    assert out.shape == x.shape
    assert_close(out, ref.expand_as(x), F64_REL)


@given(n=mesh_sizes)
def test_all_reduce_of_replicated_is_replicated(n):
    mesh = fdp.Mesh(n)
    t = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, 2, dtype=torch.float64)}
    reps = fdp.replicate(t, mesh)
    assert_close(fdp.all_reduce(reps, mesh, "mean"), reps, F64_REL)
    assert_close(fdp.all_reduce(reps, mesh, "max"), reps, 0)


@given(n=mesh_sizes, b=batch_sizes, data=st.data())
def test_weighted_mean_by_counts_is_the_global_mean(n, b, data):
    """Per-replica means weighted by real counts == mean over the whole batch."""
    mesh = fdp.Mesh(n)
    x = torch.randn(b, dtype=torch.float64)
    sharded = fdp.scatter(x, mesh, split=data.draw(splits(b, n)))
    means = (sharded.data * sharded.mask).sum(1) / sharded.counts  # 0/0 = NaN on empty replicas
    out = fdp.all_reduce(means, mesh, "mean", weights=sharded.counts)
    assert_close(out[0], x.mean(), F64_REL)


@pytest.mark.parametrize("n", [1, 3])
def test_integer_and_bool_leaves_survive_scatter_gather(n):
    mesh = fdp.Mesh(n)
    batch = {"i": torch.arange(7), "b": torch.arange(7) % 2 == 0}
    back = fdp.gather(fdp.scatter(batch, mesh, split="even"), mesh)
    assert torch.equal(back["i"], batch["i"]) and torch.equal(back["b"], batch["b"])


def test_primitives_place_data_on_the_mesh_device():
    mesh = fdp.Mesh(2, device="meta")
    assert fdp.replicate(torch.ones(3), mesh).device.type == "meta"
    sharded = fdp.scatter(torch.ones(5, 2), mesh)
    assert sharded.data.device.type == "meta" and sharded.mask.device.type == "meta"


@pytest.mark.parametrize("split", ["chunk", "even"])
def test_a_hundred_thousand_replicas(split):
    """Every primitive is linear in the mesh size: 37 rows over 10^5 replicas (most empty)."""
    n, x = 100_000, torch.arange(37.0).reshape(37, 1)
    mesh = fdp.Mesh(n)
    sharded = fdp.scatter({"x": x}, mesh, split=split)
    assert int(sharded.counts.sum()) == 37 and sharded.mask.shape[0] == n
    assert torch.equal(fdp.gather(sharded, mesh)["x"], x)
    doubled = fdp.pmap(lambda b: {"x": b["x"] * 2}, mesh)(sharded)
    assert torch.equal(fdp.gather(doubled, mesh)["x"], 2 * x)
    assert sharded.layout.max_size == 1  # one row per replica with rows: the sum is the row
    mean = fdp.all_reduce(sharded.data["x"].sum(1), mesh, "mean", weights=sharded.counts)
    assert torch.allclose(mean[0], x.mean(0)) and mean.shape == (n, 1)
    assert torch.equal(fdp.unreplicate(fdp.replicate(x, mesh), mesh), x)
