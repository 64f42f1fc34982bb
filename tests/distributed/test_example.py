"""``examples/torchrun_mlp.py`` under torchrun (2 gloo processes) trains and ends where one
device ends."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_torchrun_example_matches_one_device():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "torchrun_mlp.py"), "--epochs", "3"],
        capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    assert "2 processes (gloo)" in out, out
    accuracy = float(re.search(r"train accuracy ([0-9.]+)", out).group(1))
    diff = float(re.search(r"max \|parameter difference\| vs one device = ([0-9.e+-]+)",
                           out).group(1))
    assert accuracy > 0.85, out
    assert diff < 1e-5, out  # float32: the same run up to summation order (seen: ~3e-7)
