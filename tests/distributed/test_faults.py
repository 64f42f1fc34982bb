"""Failures on a distributed mesh: a rank that raises, dies or is stuck makes the others fail
within the mesh's timeout (never a hang), and ranks that disagree on shapes get a clear error.
Under torchrun, a fault ends the whole job: every rank exits non-zero, the cause in the log.

Each test starts fresh processes (``fdp.launch.run``, or torchrun): a failure leaves a process
group unusable.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fdp
import fdp.launch
from tests.distributed import jobs, torchrun

MESH_TIMEOUT = 3.0  # seconds a collective waits for the others
RUN_TIMEOUT = 45.0  # bound on each whole test run
FAULT_JOB = Path(__file__).with_name("fault_job.py")  # its MESH_TIMEOUT is ours
EXIT_BOUND = MESH_TIMEOUT + 30  # a torchrun job with a fault ends this long after it
STARTUP = 120.0  # torchrun and two ranks importing torch, on a busy 2-core machine


def _mesh() -> fdp.Mesh:
    return fdp.Mesh.distributed(timeout=MESH_TIMEOUT)


def _psum_mapped(mesh: fdp.Mesh, x: torch.Tensor) -> torch.Tensor:
    return fdp.pmap(lambda v: fdp.psum(v, "dp"), mesh)(x)


def _stuck_rank(stuck: int) -> tuple:
    """Rank ``stuck`` never reaches the collective; the others report how they failed."""
    mesh = _mesh()
    if dist.get_rank() == stuck:
        time.sleep(MESH_TIMEOUT + 1.5)
        return ("slept",)
    start = time.monotonic()
    try:
        _psum_mapped(mesh, torch.ones(1, 3))
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return ("no error",)


def test_a_stuck_rank_makes_the_others_time_out():
    start = time.monotonic()
    results = fdp.launch.run(_stuck_rank, 2, args=(1,), timeout=RUN_TIMEOUT)
    name, message, waited = results[0]
    assert name == "PeerTimeout", results[0]  # a TimeoutError
    assert "psum" in message and f"{MESH_TIMEOUT:g} s" in message, message
    assert MESH_TIMEOUT - 0.5 <= waited <= MESH_TIMEOUT + 3
    assert results[1] == ("slept",)
    assert time.monotonic() - start < RUN_TIMEOUT


def _one_rank_raises() -> None:
    mesh = _mesh()
    if dist.get_rank() == 1:
        raise KeyError("boom in rank 1")
    _psum_mapped(mesh, torch.ones(1, 3))  # the peer is gone: this raises, naming psum


def test_an_exception_in_one_rank_is_raised_with_its_rank_and_the_others_fail_fast():
    start = time.monotonic()
    with pytest.raises(KeyError, match="boom in rank 1") as info:
        fdp.launch.run(_one_rank_raises, 2, timeout=RUN_TIMEOUT)
    notes = "\n".join(info.value.__notes__)
    assert "raised in rank 1 of 2" in notes and "_one_rank_raises" in notes  # remote traceback
    assert "rank 0: " in notes and "psum" in notes  # the peer failed too, within the timeout
    assert time.monotonic() - start < MESH_TIMEOUT + 10


def _one_rank_dies() -> None:
    mesh = _mesh()
    if dist.get_rank() == 1:
        os._exit(7)
    loss_fn = jobs.loss_fn(jobs.Spec())
    params = {k: v.detach() for k, v in jobs.module(jobs.Spec()).named_parameters()}
    batch = {"x": torch.randn(6, 3, dtype=torch.float64),
             "t": torch.randn(6, 2, dtype=torch.float64)}
    fdp.value_and_grad(loss_fn, mesh)(params, batch)


def test_a_rank_that_dies_is_reported_and_the_others_fail_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(fdp.launch.RankFailed, match="rank 1 of 2 exited with exit code 7") as e:
        fdp.launch.run(_one_rank_dies, 2, timeout=RUN_TIMEOUT)
    assert time.monotonic() - start < MESH_TIMEOUT + 10
    notes = "\n".join(getattr(e.value, "__notes__", []))
    assert "rank 0" in notes and "value_and_grad" in notes, notes


def _mismatched(kind: str) -> None:
    mesh = _mesh()
    rank = dist.get_rank()
    if kind == "shape":
        _psum_mapped(mesh, torch.ones(1, 2 + rank))
    elif kind == "dtype":
        _psum_mapped(mesh, torch.ones(1, 2, dtype=torch.float64 if rank else torch.float32))
    elif kind == "op":
        fn = (lambda v: fdp.psum(v, "dp")) if rank == 0 else (lambda v: fdp.all_gather(v, "dp"))
        fdp.pmap(fn, mesh)(torch.ones(1, 2))
    elif kind == "gather":
        fdp.gather(fdp.scatter(torch.arange(4.0 + rank * 2), mesh), mesh)
    elif kind == "batch":
        spec = jobs.Spec()
        params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
        batch = {"x": torch.randn(5 + rank, 3, dtype=torch.float64),
                 "t": torch.randn(5 + rank, 2, dtype=torch.float64)}
        fdp.value_and_grad(jobs.loss_fn(spec), mesh)(params, batch)
    else:
        spec = jobs.Spec(widths=(4 + rank,))
        params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
        batch = {"x": torch.randn(6, 3, dtype=torch.float64),
                 "t": torch.randn(6, 2, dtype=torch.float64)}
        fdp.value_and_grad(jobs.loss_fn(spec), mesh)(params, batch)


@pytest.mark.parametrize(("kind", "expected"), [
    ("shape", r"psum: the ranks of the distributed mesh disagree: rank 0: float32\[2\], "
              r"rank 1: float32\[3\]"),
    ("dtype", r"rank 0: float32\[2\], rank 1: float64\[2\]"),
    ("op", r"rank 0: psum, rank 1: all_gather"),
    ("gather", r"all_gather: .*rank 0: float32\[2\], rank 1: float32\[3\]"),
    ("batch", r"value_and_grad: .*rank 0: split=\[3, 2\] at dim=0, rank 1: split=\[3, 3\].*"
              r"same global batch"),
    ("params", r"value_and_grad: .*rank 0: params\['0.weight'\]: float64\[4, 3\], "
               r"rank 1: params\['0.weight'\]: float64\[5, 3\]"),
])
def test_ranks_that_disagree_on_shapes_get_a_clear_error(kind, expected):
    with pytest.raises(ValueError, match=expected) as info:
        fdp.launch.run(_mismatched, 2, args=(kind,), timeout=RUN_TIMEOUT)
    notes = "\n".join(info.value.__notes__)
    assert re.search(r"other ranks failed too: rank [01]: ValueError", notes), notes


def _later_mismatch(kind: str) -> list[str]:
    """Two agreed calls, then one where the ranks differ: the steady-state path (no check of
    its own, a fingerprint in the last bucket) still raises the same error on every rank."""
    mesh = _mesh()
    rank = dist.get_rank()
    spec = jobs.Spec(widths=(4,))
    vg = fdp.value_and_grad(jobs.loss_fn(spec), mesh)
    params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
    batch = {"x": torch.randn(6, 3, dtype=torch.float64),
             "t": torch.randn(6, 2, dtype=torch.float64)}
    seen = []
    for _ in range(2):
        seen.append(str(vg(params, batch)[0].item()))
    if kind == "batch":  # same bucket sizes: found by the fingerprint
        batch = {k: v[:5 + rank] for k, v in batch.items()}
    elif kind == "params":  # other bucket sizes on rank 1 only
        if rank == 1:
            params = {k: v.detach() for k, v in
                      jobs.module(jobs.Spec(widths=(5,))).named_parameters()}
            vg = fdp.value_and_grad(jobs.loss_fn(jobs.Spec(widths=(5,))), mesh)
    else:  # every rank changes alike: a new layout, agreed, then steady again
        params = {k: v.detach() for k, v in
                  jobs.module(jobs.Spec(widths=(5,))).named_parameters()}
        vg = fdp.value_and_grad(jobs.loss_fn(jobs.Spec(widths=(5,))), mesh)
        seen += [str(vg(params, batch)[0].item()) for _ in range(2)]
        params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
        vg = fdp.value_and_grad(jobs.loss_fn(spec), mesh)
    seen.append(str(vg(params, batch)[0].item()))
    return seen


@pytest.mark.parametrize(("kind", "expected"), [
    ("batch", r"value_and_grad: .*rank 0: split=\[3, 2\] at dim=0, rank 1: split=\[3, 3\]"),
    ("params", r"value_and_grad: .*rank 0: params\['0.weight'\]: float64\[4, 3\], "
               r"rank 1: params\['0.weight'\]: float64\[5, 3\]"),
])
def test_ranks_that_disagree_after_agreed_calls_get_the_same_clear_error(kind, expected):
    with pytest.raises(ValueError, match=expected) as info:
        fdp.launch.run(_later_mismatch, 2, args=(kind,), timeout=RUN_TIMEOUT)
    notes = "\n".join(info.value.__notes__)
    assert re.search(r"other ranks failed too: rank [01]: ValueError", notes), notes


def test_ranks_that_change_params_alike_keep_running():
    results = fdp.launch.run(_later_mismatch, 2, args=("alike",), timeout=RUN_TIMEOUT)
    assert results[0] == results[1] and len(results[0]) == 5


def _collectives_per_call(shared_memory: bool) -> list[dict[str, int]]:
    """How many collectives each of 4 value_and_grad calls starts, by kind."""
    from fdp.backends import _dist_comm

    counts: dict[str, int] = {}

    def counted(name: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    _dist_comm._gather_single = counted("all_gather", _dist_comm._gather_single)
    dist.all_reduce = counted("all_reduce", dist.all_reduce)
    spec = jobs.Spec()
    mesh = fdp.Mesh.distributed(timeout=MESH_TIMEOUT, shared_memory=shared_memory)
    vg = fdp.value_and_grad(jobs.loss_fn(spec), mesh)
    params = {k: v.detach() for k, v in jobs.module(spec).named_parameters()}
    per_call = []
    for rows in (6, 6, 7, 6):  # a batch of another size: the same buckets, no check of its own
        batch = {"x": torch.randn(rows, 3, dtype=torch.float64),
                 "t": torch.randn(rows, 2, dtype=torch.float64)}
        counts.clear()
        vg(params, batch)
        per_call.append(dict(counts))
    return per_call


@pytest.mark.parametrize("shared_memory", [False, True])
def test_value_and_grad_starts_no_collective_of_its_own_in_steady_state(shared_memory):
    per_call = fdp.launch.run(_collectives_per_call, 2, args=(shared_memory,),
                              timeout=RUN_TIMEOUT)[0]
    # the first call checks, and the ranks decide whether they share memory; sharing, they
    # map the segments: a token, "every rank created its file", "every rank mapped every file"
    setup = 1 + (3 if shared_memory else 0)
    assert per_call[0] == {"all_gather": 1, "all_reduce": 1 + setup}, per_call
    # then only the gradients' bucket (through shared memory: its barrier)
    assert per_call[1:] == [{"all_reduce": 1}] * 3, per_call


def test_mesh_distributed_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"init_process_group\('gloo'\).*fdp.launch.run"):
        fdp.Mesh.distributed()


def _bad_arguments() -> list[str]:
    messages = []
    for kwargs in ({"timeout": 0}, {"bucket_mb": -1}, {"overlap": 1}, {"shared_memory": 1},
                   {"shared_memory": True, "device": "meta"}, {"axis_name": ""},
                   {"group": "world"}):
        try:
            fdp.Mesh.distributed(**kwargs)
        except (TypeError, ValueError) as e:
            messages.append(str(e))
    group = dist.new_group([0])
    if dist.get_rank() == 1:
        try:
            fdp.Mesh.distributed(group)
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_bad_arguments_are_named():
    messages = fdp.launch.run(_bad_arguments, 2, timeout=RUN_TIMEOUT)
    assert len(messages[0]) == 7 and len(messages[1]) == 8
    for want, got in zip(["timeout", "bucket_mb", "overlap", "shared_memory",
                          "shared_memory=True needs CPU", "axis_name", "group"], messages[1],
                         strict=False):
        assert got.startswith("Mesh.distributed: " + want), got
    assert "not a member of the given group" in messages[1][7]


# --- under torchrun: a fault ends the job -------------------------------------------------------


def _wait_for(condition: Callable[[], bool], seconds: float, log: Path) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"the job did not start in {seconds:g} s:\n{log.read_text()}"
        time.sleep(0.1)


def _rank_exit_codes(log: str) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's failure report."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", log)
    return {int(rank): int(code) for rank, code in found}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_torchrun_job_with_a_stuck_rank_ends_on_every_rank_with_the_cause(tmp_path):
    """Rank 1 never reaches the collective and never exits by itself: rank 0's PeerTimeout
    ends rank 0 (code 1, despite its ``destroy_process_group()`` in a ``finally:``), and
    torchrun then stops rank 1, all within the mesh's timeout + 30 s."""
    log = tmp_path / "log.txt"
    proc = torchrun.start(torchrun.command(FAULT_JOB, "stuck", tmp_path), log)
    try:
        _wait_for(lambda: len(list(tmp_path.glob("rank*.pid"))) == 2 or proc.poll() is not None,
                  STARTUP, log)
        start = time.monotonic()
        code = torchrun.finish(proc, EXIT_BOUND)
        took = time.monotonic() - start
    finally:
        torchrun.stop(proc)
    text = log.read_text()
    assert code is not None, f"the job still ran {EXIT_BOUND:g} s after the fault:\n{text}"
    assert code != 0 and took < EXIT_BOUND, (code, took, text)
    codes = _rank_exit_codes(text)
    assert codes.get(0) == 1 and codes.get(1, 0) < 0, (codes, text)  # rank 1: killed (SIGTERM)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids), text
    assert "PeerTimeout: psum on a distributed mesh" in text, text  # the traceback
    assert "fdp: exiting with code 1 after a failed collective (PeerTimeout: psum" in text, text


def test_a_torchrun_job_whose_ranks_disagree_exits_with_the_error_and_no_abort(tmp_path):
    """The ValueError ends both ranks with code 1 (or torchrun's SIGTERM, for the one still
    exiting when the other has failed), never an abort at exit (code 134, -6)."""
    log = tmp_path / "log.txt"
    proc = torchrun.start(torchrun.command(FAULT_JOB, "mismatch", tmp_path), log)
    try:
        code = torchrun.finish(proc, STARTUP + EXIT_BOUND)
    finally:
        torchrun.stop(proc)
    text = log.read_text()
    assert code == 1, text
    assert "ValueError: psum: the ranks of the distributed mesh disagree" in text, text
    assert "terminate called" not in text and "fdp: exiting" not in text, text
    codes = _rank_exit_codes(text)
    assert 1 in codes.values() and set(codes.values()) <= {1, -15}, (codes, text)
