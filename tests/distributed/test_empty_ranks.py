"""Ranks without rows skip loss_fn; collectives in it run over the ranks with rows, as on the
vmap and threads backends (a group over those ranks, created once by all ranks)."""

from __future__ import annotations

import pytest
import torch

import fdp
from tests.distributed import jobs


@pytest.mark.parametrize("split", [[2, 2, 0, 0], [2, 0, 2, 1], [0, 3, 0, 1]])
def test_collectives_in_the_loss_skip_ranks_without_rows(pool, split):
    """A 4-rank mesh is the pool's whole world: the group over the ranks with rows exists."""
    want = jobs.centered_loss_on(fdp.Mesh(devices=["cpu"] * len(split)), split)
    for got in pool.run(jobs.dist_centered_loss, len(split), args=(split,)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_on_a_subgroup_the_collective_raises_instead_of_hanging(pool):
    with pytest.raises(ValueError, match="ranks that received no rows"):
        pool.run(jobs.dist_centered_loss, 3, args=([2, 2, 0],))
