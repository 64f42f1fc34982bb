"""fdp.DataParallel on a distributed mesh: torch.optim over the wrapper equals one device."""

from __future__ import annotations

import pytest
import torch

import fdp
from tests.distributed import jobs

CASES = [(2, (8, 5, 7), False), (3, (7, 2, 9), False), (4, (8, 3), False), (2, (8, 6), True),
         (3, (9, 7), True)]


@pytest.mark.parametrize(("n", "sizes", "bn"), CASES)
def test_data_parallel_training_equals_one_device(pool, n, sizes, bn):
    want = jobs.data_parallel_on(fdp.Mesh(1), 0, sizes, len(sizes), bn)
    for got in pool.run(jobs.dist_data_parallel, n, args=(0, sizes, len(sizes), bn)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3])
def test_parameterless_modules_input_gradients_and_scalar_outputs(pool, n):
    want = jobs.data_parallel_edges_on(fdp.Mesh(1))
    assert want["error"]
    for got in pool.run(jobs.dist_data_parallel_edges, n):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n", [2, 3])
def test_the_nn_data_parallel_corners(pool, n):
    want = jobs.data_parallel_contract_on(fdp.Mesh(1, executor="general"))
    for got in pool.run(jobs.dist_data_parallel_contract, n):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
