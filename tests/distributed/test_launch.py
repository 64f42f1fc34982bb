"""``fdp.launch``: results in rank order, errors and warnings from the ranks reach the caller,
the total time is bounded, and the pool gives each job a group of exactly its ranks."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import fdp.launch


def _who() -> tuple:
    return (dist.get_rank(), dist.get_world_size(), os.environ["LOCAL_RANK"],
            os.environ["MASTER_ADDR"], torch.get_num_threads())


def test_run_returns_every_rank_result_in_order():
    assert fdp.launch.run(_who, 3, timeout=60) == [
        (r, 3, str(r), "127.0.0.1", 1) for r in range(3)]


def test_run_needs_a_picklable_function():
    with pytest.raises(TypeError, match=r"picklable.*module level"):
        fdp.launch.run(lambda: 1, 2)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_run_is_bounded_by_its_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] did not finish within 2 s"):
        fdp.launch.run(_sleep, 2, args=(60,), timeout=2)
    assert time.monotonic() - start < 10


def _warn() -> int:
    warnings.warn(f"a warning from rank {dist.get_rank()}", UserWarning, stacklevel=1)
    return 0


def test_warnings_in_the_ranks_are_reissued_in_the_caller():
    with pytest.warns(UserWarning, match="a warning from rank") as record:
        fdp.launch.run(_warn, 2, timeout=60)
    assert sorted(str(w.message) for w in record) == [
        "a warning from rank 0", "a warning from rank 1"]


def _unpicklable_result() -> object:
    return lambda: None


def test_an_unpicklable_result_is_an_error():
    with pytest.raises(TypeError, match="result cannot be pickled"):
        fdp.launch.run(_unpicklable_result, 1, timeout=60)


def _group_view() -> tuple:
    group = fdp.launch.current_group()
    return dist.get_rank(group), dist.get_world_size(group)


def test_pool_jobs_see_a_group_of_exactly_their_ranks(pool):
    for n in range(1, pool.nprocs + 1):
        assert pool.run(_group_view, n) == [(r, n) for r in range(n)]
    with pytest.raises(ValueError, match=r"nprocs must be an int in 1\.\.4"):
        pool.run(_group_view, 5)


def _fail_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        raise ArithmeticError("job failed")


def test_a_pool_restarts_its_workers_after_a_failed_job():
    with fdp.launch.Pool(2, timeout=60) as small:
        assert small.run(_group_view) == [(0, 2), (1, 2)]
        first = [p.pid for p in small._procs]
        with pytest.raises(ArithmeticError, match="job failed"):
            small.run(_fail_on_rank_zero)
        assert small.run(_group_view) == [(0, 2), (1, 2)]
        assert [p.pid for p in small._procs] != first
