"""Keyed dropout (``fdp.random`` keys) trains the same on a distributed mesh as on vmap: the
masks follow each example's row in the global batch, not the rank that holds it."""

from __future__ import annotations

import pytest

import fdp
from tests.distributed import jobs
from tests.helpers import F64_REL, assert_close


@pytest.mark.parametrize(("n", "rows", "microbatches"), [(2, 9, 1), (3, 10, 2), (4, 5, 1)])
def test_keyed_dropout_training_matches_vmap(pool, n, rows, microbatches):
    vmapped = jobs.dropout_on(fdp.Mesh(n), 3, rows, microbatches)
    for got in pool.run(jobs.dist_dropout, n, args=(3, rows, microbatches)):
        assert_close(got, vmapped, F64_REL)
