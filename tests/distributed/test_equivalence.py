"""One program, three backends: vmap, threads (cpu devices) and distributed (gloo processes)
give the same loss, gradients and params after k steps, equal to single-device training, and
every collective agrees across them (float64, relative 1e-10 to scale)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fdp
from tests.distributed import jobs
from tests.helpers import F64_REL, assert_close, splits

MAX_N = 4


@st.composite
def training_cases(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(1, MAX_N))
    rows = draw(st.integers(1, 12))
    split = draw(splits(rows, n))
    spec = jobs.Spec(
        d=draw(st.integers(1, 4)),
        widths=tuple(draw(st.lists(st.integers(1, 6), max_size=2))),
        out=draw(st.integers(1, 3)),
        act=draw(st.sampled_from(["tanh", "sigmoid"])),
        loss=draw(st.sampled_from(["mse", "ce"])),
        strategy=draw(st.sampled_from(["weighted", "gather"])),
        split=tuple(split) if isinstance(split, list) else split,
        opt=draw(st.sampled_from(["sgd", "momentum", "adam"])),
    )
    steps = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
    batches = [{"x": torch.randn(rows, spec.d, generator=gen, dtype=torch.float64),
                "t": torch.randn(rows, spec.out, generator=gen, dtype=torch.float64),
                "y": torch.randint(0, spec.out, (rows,), generator=gen)}
               for _ in range(steps)]
    bucket_mb = draw(st.sampled_from([25.0, 1e-4]))  # 1e-4 MB: a bucket per tensor or two
    # overlap, and whether buckets are summed through shared memory or gloo's sockets
    return n, spec, params, batches, bucket_mb, draw(st.booleans()), draw(st.booleans())


def _assert_same_on_every_rank(results: list) -> None:
    for rank, other in enumerate(results[1:], 1):
        fdp.tree.map_with_path(
            lambda p, a, b, rank=rank: _equal(p, a, b, rank), other, results[0])


def _equal(path: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
    assert torch.equal(a, b), f"{path}: rank {rank} differs from rank 0"


@given(training_cases())
def test_training_equals_single_device_on_every_backend(pool, case):
    n, spec, params, batches, bucket_mb, overlap, shared = case
    single = jobs.train_single(spec, params, batches)
    vmapped = jobs.train_on(fdp.Mesh(n), spec, params, batches)
    threads = jobs.train_on(fdp.Mesh(devices=["cpu"] * n), spec, params, batches)
    ranks = pool.run(jobs.dist_train, n,
                     args=(spec, params, batches, bucket_mb, overlap, shared))
    _assert_same_on_every_rank(ranks)  # bitwise: the replicas never drift apart
    assert_close(vmapped, single, F64_REL)
    assert_close(threads, single, F64_REL)
    assert_close(ranks[0], single, F64_REL)


@st.composite
def collective_cases(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(1, MAX_N))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):  # ties, where pmax/pmin share the gradient
        x = x.round()
    rows = torch.randn(draw(st.integers(1, 9)), 2, generator=gen, dtype=torch.float64)
    axis = draw(st.integers(-len(shape) - 1, len(shape)))
    return n, x, rows, axis


@given(collective_cases())
def test_collectives_agree_across_backends(pool, case):
    n, x, rows, axis = case
    vmapped = jobs.collectives_on(fdp.Mesh(n), x, rows, axis)
    threads = jobs.collectives_on(fdp.Mesh(devices=["cpu"] * n), x, rows, axis)
    ranks = pool.run(jobs.dist_collectives, n, args=(x, rows, axis))
    assert_close(threads, vmapped, F64_REL)
    whole = ("masked", "gathered", "replicated")  # every rank gets the whole result
    for rank, got in enumerate(ranks):
        for key, value in got.items():
            want = vmapped[key] if key in whole else vmapped[key][rank:rank + 1]
            if key == "reduced":
                want = vmapped[key][:1]
            assert_close(value, want, F64_REL)
    assert torch.equal(ranks[0]["gathered"], rows)


@settings(max_examples=min(settings().max_examples, 40))  # each example runs three meshes
@given(n=st.integers(1, MAX_N), seed=st.integers(0, 2**16), data=st.data())
def test_exchanges_agree_across_backends(pool, n, seed, data):
    perm = tuple(data.draw(st.permutations(range(n))))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * n, n, generator=gen, dtype=torch.float64)
    vmapped = jobs.exchange_on(fdp.Mesh(n), x, perm)
    threads = jobs.exchange_on(fdp.Mesh(devices=["cpu"] * n), x, perm)
    ranks = pool.run(jobs.dist_exchange, n, args=(x, perm))
    assert_close(threads, vmapped, F64_REL)
    assert vmapped["psum_int32"].dtype == torch.int32 and vmapped["pmean_int"].is_floating_point()
    for rank, got in enumerate(ranks):
        assert_close(got, {k: v[rank:rank + 1] for k, v in vmapped.items()}, F64_REL)


@pytest.mark.parametrize("n", [2, 3])
def test_frozen_and_unused_parameters_stay_as_torch_optim_leaves_them(pool, n):
    want = jobs.frozen_training_on(fdp.Mesh(1))
    for got in pool.run(jobs.dist_frozen_training, n):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for name in ("stem.weight", "stem.bias", "spare"):
            assert torch.equal(got[name], want[name])


@pytest.mark.parametrize("name", ["lstm-packed-bidirectional", "masked-encoder", "branchy"])
def test_the_zoo_trains_on_processes_as_on_one_device(pool, name):
    want = jobs.zoo_training_on(fdp.Mesh(1, executor="general"), name)
    for got in pool.run(jobs.dist_zoo_training, 3, args=(name,)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
