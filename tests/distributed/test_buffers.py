"""Buffer policies (BatchNorm: replica0, mean, sync) and aux on a distributed mesh give what the
threads backend gives, uneven shards included; aux holds this rank's replica only."""

from __future__ import annotations

import pytest
import torch

import fdp
from tests.distributed import jobs

CASES = [("sync", [4, 4, 3]), ("sync", [6, 0, 5, 0]), ("replica0", "chunk"), ("mean", [5, 6]),
         ("mean", "even")]


@pytest.mark.parametrize(("policy", "split"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_buffer_policies_match_the_threads_backend(pool, policy, split):
    n = len(split) if isinstance(split, list) else 2
    threads = jobs.buffers_on(fdp.Mesh(devices=["cpu"] * n), 0, policy, split)
    ranks = pool.run(jobs.dist_buffers, n, args=(0, policy, split))
    sizes = split if isinstance(split, list) else fdp.Layout((6, 5)).sizes
    for rank, got in enumerate(ranks):
        rows = got.pop("rows")
        if sizes[rank] == 0:  # aux: this rank's replica, if it had rows
            assert rows.numel() == 0, rows
        else:
            assert rows.tolist() == [sizes[rank]]
        want = {k: v for k, v in threads.items() if k != "rows"}
        # BatchNorm makes some gradients 0 up to rounding: a small absolute floor
        fdp.tree.map_with_path(lambda p, a, e: torch.testing.assert_close(
            a, e, rtol=1e-10, atol=1e-12, msg=lambda m, p=p: f"{p}: {m}"), got, want)
    first, last = ranks[0]["buffers"], ranks[-1]["buffers"]
    assert all(torch.equal(first[k], last[k]) for k in first)  # every rank keeps the same
