"""Sharded optimizer state on gloo processes: each holds its slice, training is unchanged."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import jobs
from tests.test_zero import assert_params_close


@pytest.mark.parametrize(("n", "microbatches"), [(2, 1), (3, 2)])
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam", "clip+adamw"])
def test_sharded_steps_equal_unsharded_steps_on_processes(pool, n, microbatches, opt_name):
    results = pool.run(jobs.dist_zero_training, n, args=(opt_name, microbatches))
    for got in results:
        assert_params_close(got["got"], got["want"])
        assert_params_close(got["got"], results[0]["got"])  # every process: the same params
        torch.testing.assert_close(got["losses"], got["want_losses"], rtol=1e-12, atol=0)
    if opt_name != "sgd-momentum":  # Adam's moments: each process holds about 1/n of them
        full = int(results[0]["full_bytes"])
        for got in results:
            assert int(got["state_bytes"]) < full / n + 200


def test_each_process_checkpoints_its_own_slices(pool, tmp_path):
    results = pool.run(jobs.dist_zero_checkpoint, 3, args=(str(tmp_path),))
    assert sorted(r["name"] for r in results) == [f"state.rank{r}-of-3.pt" for r in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"state.rank{r}-of-3.pt"
                                                          for r in range(3)]
    for got in results:
        for k, v in got["params"].items():
            assert torch.equal(got["resumed"][k], v)
