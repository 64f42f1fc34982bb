"""The public strategies draw what they promise, deterministically, without touching torch's RNG."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import find, given, settings
from hypothesis import strategies as st

import fdp
import fdp.testing
from fdp.testing import strategies as fst
from fdp.testing._models import CaseSpec, build_case
from fdp.testing._spec import call_args


@given(fst.meshes())
def test_meshes_default_range(mesh):
    assert isinstance(mesh, fdp.Mesh) and 1 <= mesh.size <= 8 and mesh.backend_name == "vmap"


@given(fst.meshes(3, 5))
def test_meshes_custom_range(mesh):
    assert 3 <= mesh.size <= 5


@given(n=st.integers(1, 8), b=st.integers(1, 20), data=st.data())
def test_splits_are_valid_rules(n, b, data):
    rule = data.draw(fst.splits(b, n))
    sizes = fdp._layout.split_sizes(b, n, rule)
    assert len(sizes) == n and sum(sizes) == b and min(sizes) >= 0
    explicit = data.draw(fst.splits(b, n, kinds=["explicit"]))
    assert isinstance(explicit, list) and sum(explicit) == b and len(explicit) == n


@given(fst.mesh_batches(max_batch=12))
def test_mesh_batches(mb):
    assert 1 <= mb.batch_size <= 12 and 1 <= mb.mesh.size <= 8
    assert sum(mb.sizes) == mb.batch_size and len(mb.sizes) == mb.mesh.size
    sharded = fdp.scatter(torch.zeros(mb.batch_size, 1), mb.mesh, split=mb.split)
    assert sharded.layout.sizes == mb.sizes  # the same rule fdp.scatter applies


@given(fst.mesh_batches(min_batch=2, max_batch=16, kinds=["chunk", "even"], divisible=True))
def test_mesh_batches_divisible_give_equal_shards(mb):
    assert mb.batch_size % mb.mesh.size == 0 and 2 <= mb.batch_size <= 16
    assert len(set(mb.sizes)) == 1 and mb.split in ("chunk", "even")


def test_mesh_batches_draw_uneven_and_empty_shards():
    strategy = fst.mesh_batches(min_size=2, max_batch=10)
    options = settings(max_examples=2000, database=None)
    uneven = find(strategy, lambda mb: len(set(mb.sizes)) > 1, settings=options)
    empty = find(strategy, lambda mb: 0 in mb.sizes, settings=options)
    assert len(set(uneven.sizes)) > 1 and 0 in empty.sizes


@given(b=st.integers(1, 6), data=st.data())
def test_pytrees(b, data):
    tree = data.draw(fst.pytrees(b))
    leaves = pytree.tree_leaves(tree)
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
    assert all(x.shape[0] == b and x.dim() <= 3 for x in leaves)
    assert len({x.dtype for x in leaves}) == 1 and leaves[0].dtype in (torch.float64,
                                                                       torch.float32)
    out = fdp.gather(fdp.scatter(tree, fdp.Mesh(3)), fdp.Mesh(3))  # usable as a batch
    assert all(torch.equal(a, e) for a, e in zip(pytree.tree_leaves(out), leaves, strict=True))


@given(fst.model_cases(batch_size=5))
def test_model_cases_run(case):
    args, kwargs = call_args(case.inputs(case.batch))
    out = case.module(*args, **kwargs)
    assert out.shape == (5, 3) and case.loss_fn(out, case.batch).dim() == 0
    assert case.kind in ("mlp", "cnn", "kwargs") and case.module.training


@given(fst.models(dtypes=[torch.float32], batchnorm=True, dropout=True, training=False))
def test_models_options(module):
    names = dict(module.named_modules())
    assert isinstance(names["body.bn"], torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(names["body.drop"], torch.nn.Dropout) and not module.training
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_cases_are_built_from_the_seed_without_touching_torch_rng():
    spec = CaseSpec("cnn", 4, 7, 2, torch.float64, True, 0.0, True, "mse", "dict")
    before = torch.get_rng_state()
    a, b = build_case(spec), build_case(spec)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.batch["x"], b.batch["x"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="min <= max"):
        fst.meshes(4, 2)
    with pytest.raises(ValueError, match="backends"):
        fst.meshes(backends=["tpu"])
    with pytest.raises(ValueError, match="kinds"):
        fst.splits(4, 2, kinds=["halves"])
    with pytest.raises(ValueError, match="dtypes"):
        fst.pytrees(3, dtypes=[torch.int64])
    with pytest.raises(ValueError, match="kinds"):
        fst.model_cases(["transformer"])
    with pytest.raises(ValueError, match="divisible"):
        fst.mesh_batches(min_size=4, max_batch=3, divisible=True)
    with pytest.raises(TypeError, match="ints"):
        fst.meshes(1.5, 3)


def test_strategies_attribute_is_the_module():
    assert fdp.testing.strategies is fst


@given(fst.meshes(2, 3, backends=["threads"]))
def test_meshes_threads_backend(mesh):
    assert mesh.backend_name == "threads" and mesh.size in (2, 3)
