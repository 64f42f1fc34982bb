"""Elastic resume: ``examples/elastic_resume.py`` under torchrun, with one rank killed at a step
(SIGKILL, first attempt only) and ``--max-restarts 1``, ends with parameters bit for bit equal
to a run that was never interrupted."""

from __future__ import annotations

import time

import torch

from tests.distributed import torchrun

EXAMPLE = torchrun.ROOT / "examples" / "elastic_resume.py"
LIMIT = 240.0  # per job, on a busy 2-core machine (seen: about 25 s for both jobs at once)


def test_a_killed_rank_is_restarted_and_training_resumes_bit_for_bit(tmp_path):
    jobs = {}
    for name, kill in (("interrupted", ["--kill-at", "7"]), ("straight", [])):
        args = ["--checkpoint", tmp_path / name, "--steps", "10", "--every", "5",
                "--timeout", "20", "--out", tmp_path / f"{name}.pt", *kill]
        log = tmp_path / f"{name}.log"
        jobs[name] = log, torchrun.start(torchrun.command(EXAMPLE, *args, max_restarts=1), log)
    start = time.monotonic()
    try:
        codes = {name: torchrun.finish(proc, max(1.0, start + LIMIT - time.monotonic()))
                 for name, (_, proc) in jobs.items()}
    finally:
        for _, proc in jobs.values():
            torchrun.stop(proc)
    logs = {name: log.read_text() for name, (log, _) in jobs.items()}
    assert codes == {"interrupted": 0, "straight": 0}, logs
    assert "attempt 1: resumed from the checkpoint at step 5" in logs["interrupted"], logs
    assert "resumed" not in logs["straight"], logs["straight"]
    interrupted, straight = (torch.load(tmp_path / f"{name}.pt", weights_only=True)
                             for name in ("interrupted", "straight"))
    assert interrupted.keys() == straight.keys()
    for key in straight:
        assert torch.equal(interrupted[key], straight[key]), key
