"""Gradient buckets through shared memory (``fdp.backends._host_arena``): the same numbers as
gloo's all-reduce (bitwise on two ranks), the same bits on every rank, growth when a larger
model comes, a collective fallback to gloo where a rank cannot share, and no files left."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

import fdp
import fdp.launch
from fdp.backends import _host_arena
from fdp.backends._host_arena import HostArena, aligned
from tests.distributed import jobs

RUN_TIMEOUT = 60.0


def _sharing(mesh: fdp.Mesh) -> str:
    return mesh._backend.comm()._sharing  # type: ignore[attr-defined]


def _train_both(specs: list[jobs.Spec], rows: int) -> dict:
    """value_and_grad and 3 SGD steps per spec, with and without shared memory, the specs one
    after the other on the same two meshes (a larger model grows the segments)."""
    meshes = {m: jobs.mesh_here(shared_memory=m) for m in (True, False)}
    out: dict = {}
    for i, spec in enumerate(specs):
        torch.manual_seed(i)
        params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
        gen = torch.Generator().manual_seed(i)
        batches = [{"x": torch.randn(rows + j, spec.d, generator=gen, dtype=torch.float64),
                    "t": torch.randn(rows + j, spec.out, generator=gen, dtype=torch.float64)}
                   for j in range(3)]  # uneven splits too
        for shared, mesh in meshes.items():
            out[(i, shared)] = jobs.train_on(mesh, spec, params, batches)
    out["sharing"] = {m: _sharing(mesh) for m, mesh in meshes.items()}
    return out


SPECS = [jobs.Spec(d=3, widths=(5,)), jobs.Spec(d=40, widths=(300, 200), out=7),
         jobs.Spec(d=3, widths=(5,), strategy="gather")]


@pytest.mark.parametrize("n", [2, 3])
def test_shared_memory_sums_like_gloo_and_the_same_on_every_rank(pool, n):
    ranks = pool.run(_train_both, n, args=(SPECS, 7))
    for got in ranks:
        assert got["sharing"] == {True: "on", False: "off"}
        for i in range(len(SPECS)):
            shm, gloo = got[(i, True)], got[(i, False)]
            if n == 2:  # x0 + x1 is x1 + x0: gloo's ring gives the same bits
                fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), shm, gloo)
            else:  # another order of the sum: rounding apart
                fdp.tree.map_with_path(
                    lambda p, a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14),
                    shm, gloo)
    for got in ranks[1:]:  # every rank sums in rank order: the same bits everywhere
        for i in range(len(SPECS)):
            fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), got[(i, True)],
                                   ranks[0][(i, True)])


def _in_parts_and_whole(spec: jobs.Spec) -> dict:
    """The same training with every bucket summed in parts, and with none."""
    out, default = {}, _host_arena.SCATTER_BYTES
    try:
        for name, threshold in (("parts", 0), ("whole", 1 << 62)):
            _host_arena.SCATTER_BYTES = threshold  # the pool's processes live on: restored
            out[name] = _train_both([spec], 7)[(0, True)]
    finally:
        _host_arena.SCATTER_BYTES = default
    return out


def test_summing_in_parts_gives_the_bits_of_summing_whole(pool):
    for got in pool.run(_in_parts_and_whole, 3, args=(SPECS[1],)):
        fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), got["parts"], got["whole"])


def _bitwise(path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), path


def _private_shm_dir(blind_rank: int | None, shared_memory: bool | None) -> dict:
    """Trains with the segments' files in a fresh directory; ``blind_rank`` looks elsewhere
    (as a rank on another host would). Returns what it saw, and what is left in the dir."""
    rank = dist.get_rank()
    shared = [tempfile.mkdtemp(prefix="fdp-test-", dir=_host_arena.SHM_DIR) if rank == 0
              else None]
    dist.broadcast_object_list(shared, 0)
    here = shared[0]
    _host_arena.SHM_DIR = here if rank != blind_rank else os.path.join(here, "elsewhere")
    spec = jobs.Spec()
    params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
    batch = {"x": torch.randn(6, 3, dtype=torch.float64),
             "t": torch.randn(6, 2, dtype=torch.float64)}
    mesh = fdp.Mesh.distributed(timeout=30, shared_memory=shared_memory)
    try:
        got = jobs.train_on(mesh, spec, params, [batch])
        error = None
    except RuntimeError as e:
        got, error = None, str(e)
    gloo = jobs.train_on(fdp.Mesh.distributed(timeout=30, shared_memory=False), spec, params,
                         [batch])
    dist.barrier()
    left = os.listdir(here)
    dist.barrier()
    if rank == 0 and not left:
        os.rmdir(here)
    return {"got": got, "gloo": gloo, "error": error, "left": left, "sharing": _sharing(mesh)}


def test_segments_leave_no_files():
    for res in fdp.launch.run(_private_shm_dir, 2, args=(None, None), timeout=RUN_TIMEOUT):
        assert res["sharing"] == "on" and res["left"] == []
        fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), res["got"], res["gloo"])


def test_a_rank_that_cannot_share_makes_every_rank_use_gloo():
    for res in fdp.launch.run(_private_shm_dir, 2, args=(1, None), timeout=RUN_TIMEOUT):
        assert res["sharing"] == "off" and res["left"] == []
        fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), res["got"], res["gloo"])


def test_shared_memory_true_raises_on_every_rank_where_it_cannot_share():
    for res in fdp.launch.run(_private_shm_dir, 2, args=(0, True), timeout=RUN_TIMEOUT):
        assert res["error"] is not None and "shared_memory=True" in res["error"], res
        assert "another host" in res["error"] and res["left"] == []


class _FailsInBackward(torch.autograd.Function):
    armed = False

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        if _FailsInBackward.armed:
            raise RuntimeError("failed in backward")
        return g


def _abandoned_call(slow_seconds: float) -> tuple:
    """Call K (rank 1 sums slowly), call K+1 abandoned on every rank after its first bucket
    started (overlap=True, tiny buckets), call K+2 with other numbers: K's result must stay."""
    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        h = _FailsInBackward.apply(b["x"] @ p["w1"])
        return ((h @ p["w2"]) ** 2).sum()

    rank = dist.get_rank()
    mesh = fdp.Mesh.distributed(timeout=30, overlap=True, bucket_mb=0.001)
    torch.manual_seed(0)
    params = {"w1": torch.randn(16, 16, dtype=torch.float64),
              "w2": torch.randn(16, 16, dtype=torch.float64)}
    x = torch.randn(4, 16, dtype=torch.float64)
    vg = fdp.value_and_grad(loss_fn, mesh)
    vg(params, {"x": x})
    reduce = HostArena.reduce
    if rank == 1:
        def slow(*args: object, **kwargs: object) -> torch.Tensor:
            time.sleep(slow_seconds)
            return reduce(*args, **kwargs)
        HostArena.reduce = staticmethod(slow)  # type: ignore[method-assign]
    loss, grads = vg(params, {"x": x})
    HostArena.reduce = staticmethod(reduce)  # type: ignore[method-assign]
    _FailsInBackward.armed = True
    with pytest.raises(RuntimeError, match="failed in backward"):
        vg(params, {"x": x})
    _FailsInBackward.armed = False
    vg(params, {"x": 100 * x})
    return loss, grads, _sharing(mesh)


def test_a_call_abandoned_in_backward_does_not_overwrite_what_a_slow_rank_reads():
    ranks = fdp.launch.run(_abandoned_call, 2, args=(0.5,), timeout=RUN_TIMEOUT)
    assert ranks[0][2] == ranks[1][2] == "on"
    fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), ranks[1][:2], ranks[0][:2])


def _options_differ(mine: list) -> list:
    """Two calls on a mesh whose ranks pass different shared_memory options."""
    mesh = fdp.Mesh.distributed(timeout=30, shared_memory=mine[dist.get_rank()])
    vg = fdp.value_and_grad(lambda p, b: (b * p["w"]).sum(), mesh)
    seen = []
    for _ in range(2):
        try:
            seen.append(vg({"w": torch.ones(3)}, torch.ones(4, 3))[1]["w"])
        except RuntimeError as e:
            seen.append(str(e))
    return [*seen, _sharing(mesh)]


def test_ranks_with_different_options_agree_on_gloo_or_all_raise():
    for got in fdp.launch.run(_options_differ, 2, args=([None, False],), timeout=RUN_TIMEOUT):
        assert got[2] == "off" and all(torch.equal(g, torch.full((3,), 2.0)) for g in got[:2])
    for got in fdp.launch.run(_options_differ, 2, args=([True, False],), timeout=RUN_TIMEOUT):
        assert got[2] == "refused"
        assert all("(shared_memory=True) on some rank" in m for m in got[:2]), got  # every call


def _mapping_fails() -> tuple:
    def refuse(*args: object) -> object:
        raise OSError("no mapping here")

    _host_arena.mmap.mmap = refuse  # type: ignore[assignment]  # a fresh process: not restored
    here = _host_arena.SHM_DIR
    before = {f for f in os.listdir(here) if f.startswith("fdp-")}
    mesh = fdp.Mesh.distributed(timeout=30)
    _, grads = fdp.value_and_grad(lambda p, b: (b * p["w"]).sum(), mesh)(
        {"w": torch.ones(3)}, torch.ones(4, 3))
    dist.barrier()
    left = {f for f in os.listdir(here) if f.startswith("fdp-")} - before
    return grads["w"], _sharing(mesh), left


def test_a_rank_that_cannot_map_falls_back_with_every_rank_and_leaves_no_file():
    for grads, sharing, left in fdp.launch.run(_mapping_fails, 2, timeout=RUN_TIMEOUT):
        assert sharing == "off" and not left and torch.equal(grads, torch.full((3,), 2.0))


# --- the arena on its own (one process) --------------------------------------------------------


def _arena(ranks: int, capacity: int) -> HostArena:
    return HostArena(0, [torch.zeros(2 * capacity, dtype=torch.uint8) for _ in range(ranks)],
                     capacity)


def test_calls_alternate_halves_and_buckets_take_aligned_regions():
    arena = _arena(2, 1024)
    starts = []
    for barrier in (True, True, False, True, True):
        arena.begin()
        a = arena.take(torch.float32, 3).inputs
        b = arena.take(torch.float64, 5).inputs
        if barrier:
            arena.barrier_started()
        base = arena.segments[0].data_ptr()
        starts.append((a[0].data_ptr() - base, b[0].data_ptr() - base))
        assert a[0].numel() == 3 and b[0].dtype == torch.float64
    # a call that started no barrier leaves its half to the next call
    first, second = (0, aligned(12)), (1024, 1024 + aligned(12))
    assert starts == [first, second, first, first, second]


def test_a_call_beyond_the_capacity_raises():
    arena = _arena(2, 128)
    arena.begin()
    arena.take(torch.float32, 16)
    with pytest.raises(RuntimeError, match="outgrew"):
        arena.take(torch.float32, 32)


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min"])
def test_reduce_is_the_op_in_rank_order(op):
    xs = [torch.randn(7, dtype=torch.float64) for _ in range(3)]
    stacked = torch.stack(xs)
    want = {"sum": (xs[0] + xs[1]) + xs[2], "mean": ((xs[0] + xs[1]) + xs[2]) / 3,
            "max": stacked.amax(0), "min": stacked.amin(0)}[op]
    got = HostArena.reduce(xs, op)
    assert torch.equal(got, want)
    assert all(got.data_ptr() != x.data_ptr() for x in xs)  # a new tensor, inputs untouched


def test_recycled_buffers_are_reused_only_once_nothing_holds_them():
    from fdp.backends._recycled import BIG, Recycled

    pool = Recycled()
    first = pool.empty(torch.float32, BIG, torch.device("cpu"))
    ptr = first.data_ptr()
    second = pool.empty(torch.float32, BIG, torch.device("cpu"))
    assert second.data_ptr() != ptr  # `first` is still held
    parts = first.split([BIG // 2, BIG // 2])
    del first
    third = pool.empty(torch.float32, BIG, torch.device("cpu"))
    assert ptr not in (third.data_ptr(), second.data_ptr())  # a view of it is still held
    del parts, third
    assert pool.empty(torch.float32, BIG, torch.device("cpu")).data_ptr() == ptr  # dead now
    assert pool.empty(torch.float64, BIG, torch.device("cpu")).dtype == torch.float64


def _float32_both(rows: int, overlap: bool) -> dict:
    """A float32 model's value_and_grad and 2 SGD steps, through shared memory and gloo."""
    torch.manual_seed(3)
    model = fdp.functionalize(torch.nn.Sequential(
        torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4)))
    gen = torch.Generator().manual_seed(4)
    batch = {"x": torch.randn(rows, 20, generator=gen), "y": torch.randint(0, 4, (rows,),
                                                                            generator=gen)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        out = model.apply(p, model.buffers, b["x"])[0]
        return torch.nn.functional.cross_entropy(out, b["y"])

    out = {}
    for shared in (True, False):
        mesh = jobs.mesh_here(shared_memory=shared, overlap=overlap, bucket_mb=0.01)
        loss, grads = fdp.value_and_grad(loss_fn, mesh)(model.params, batch)
        step = fdp.data_parallel_step(loss_fn, fdp.optim.sgd(0.1), mesh)
        state = fdp.TrainState.create(model.params, fdp.optim.sgd(0.1))
        for _ in range(2):
            state, _ = step(state, batch)
        out[shared] = {"loss": loss, "grads": grads, "params": state.params}
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_float32_sums_through_shared_memory_are_gloo_bits_on_two_ranks(pool, overlap):
    for got in pool.run(_float32_both, 2, args=(13, overlap)):  # 13 rows: an uneven split
        fdp.tree.map_with_path(lambda p, a, b: _bitwise(p, a, b), got[True], got[False])
