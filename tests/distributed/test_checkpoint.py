"""Checkpoints on a distributed mesh: process 0 writes, every process returns once the file is
in place, and a failed write raises on every process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fdp
import fdp.launch


def _mesh() -> fdp.Mesh:
    return fdp.Mesh.distributed(fdp.launch.current_group(), timeout=20.0)


def _save_then_look(folder: str) -> tuple:
    mesh = _mesh()
    rank = dist.get_rank(fdp.launch.current_group())
    state = {"w": torch.full((3,), float(rank)), "step": torch.tensor(7)}
    path = fdp.save_checkpoint(folder, state, mesh=mesh)
    # every rank sees the file when save_checkpoint returns, with process 0's state
    loaded = fdp.load_checkpoint(path, like=state)
    temps = sorted(p.name for p in Path(folder).iterdir() if p.name != "state.pt")
    return rank, loaded["w"].tolist(), temps, os.path.getmtime(path)


def test_process_zero_writes_and_every_process_waits_for_the_file(pool, tmp_path):
    results = pool.run(_save_then_look, 3, args=(str(tmp_path),))
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(r[1] == [0.0, 0.0, 0.0] and r[2] == [] for r in results)
    assert len({r[3] for r in results}) == 1  # one write


def _save_fails_on_one_process(folder: str, failing: int) -> str:
    mesh = _mesh()
    rank = dist.get_rank(fdp.launch.current_group())
    (Path(folder) / "a-file").write_text("")
    target = Path(folder) / "a-file" / "x.pt" if rank == failing else Path(folder)
    try:
        fdp.save_checkpoint(target, {"w": torch.ones(2)}, mesh=mesh)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "saved"


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failed_save_raises_on_every_process_at_once(pool, tmp_path, failing):
    results = pool.run(_save_fails_on_one_process, 2, args=(str(tmp_path), failing))
    assert results[failing].startswith("ValueError") and "is a file, not a folder" in \
        results[failing], results[failing]
    other = results[1 - failing]
    assert other.startswith("RuntimeError") and "checking the arguments failed in another " \
        "process" in other, other
    assert not (tmp_path / "state.pt").exists()  # nobody wrote


def test_save_checkpoint_checks_its_mesh(tmp_path):
    with pytest.raises(TypeError, match="save_checkpoint: mesh"):
        fdp.save_checkpoint(tmp_path, {"w": torch.ones(1)}, mesh="dp")
