"""Checkpoints: atomic, code-free loads, bitwise resume, clear errors on bad files."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import fdp
import fdp._checkpoint as ckpt


def _setup():
    torch.manual_seed(0)
    model = fdp.functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"])

    optimizer = fdp.optim.adam(fdp.optim.cosine_decay_schedule(1e-2, 20))
    step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(3))
    data = {"x": torch.randn(50, 4), "y": torch.randint(0, 3, (50,))}
    return model, optimizer, step, data


def _run(step, state, data, steps):
    """Training loop whose shuffling draws from the state's generator."""
    for _ in range(steps):
        g = torch.Generator()
        g.set_state(state.rng)
        idx = torch.randperm(50, generator=g)[:17]
        state, _ = step(state._replace(rng=g.get_state()), {k: v[idx] for k, v in data.items()})
    return state


def test_save_load_continue_is_bitwise_identical(tmp_path):
    model, optimizer, step, data = _setup()
    start = fdp.TrainState.create(model.params, optimizer, seed=7)
    straight = _run(step, start, data, 8)
    midway = _run(step, start, data, 3)
    fdp.save_checkpoint(tmp_path, midway)
    restored = fdp.load_checkpoint(tmp_path, like=start)
    assert isinstance(restored, fdp.TrainState) and int(restored.step) == 3
    resumed = _run(step, restored, data, 5)
    for a, b in zip(fdp.tree.flatten(resumed)[0], fdp.tree.flatten(straight)[0], strict=True):
        assert torch.equal(a, b)


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, _, _ = _setup()
    state = fdp.TrainState.create(model.params, optimizer)
    fdp.save_checkpoint(tmp_path, state)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    newer = state._replace(step=state.step + 5)
    with pytest.raises(OSError, match="disk full"):
        fdp.save_checkpoint(tmp_path, newer)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temp file left
    assert int(fdp.load_checkpoint(tmp_path, like=state).step) == 0


def test_other_structure_is_a_clear_error(tmp_path):
    fdp.save_checkpoint(tmp_path, {"w": torch.ones(2), "b": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"has no state\['v'\]"):
        fdp.load_checkpoint(tmp_path, like={"w": torch.ones(2), "v": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"state\['w'\] .* is torch.float32\[2\], expected "
                                         r"torch.float32\[3\]"):
        fdp.load_checkpoint(tmp_path, like={"w": torch.ones(3), "b": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"entries that the target lacks: \[\"state\['b'\]\"\]"):
        fdp.load_checkpoint(tmp_path, like={"w": torch.ones(2)})
    reordered = fdp.load_checkpoint(tmp_path, like={"b": torch.ones(1), "w": torch.zeros(2)})
    assert list(reordered) == ["b", "w"] and reordered["w"].tolist() == [1.0, 1.0]


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path):
    path = fdp.save_checkpoint(tmp_path, {"w": torch.arange(1000.0)})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        fdp.load_checkpoint(tmp_path, like={"w": torch.zeros(1000)})
    flipped = bytearray(raw)
    at = raw.rfind(b"\x00\x00\xfaC")  # the float32 500.0, little-endian
    assert at > 0
    flipped[at + 3] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="does not match the digest"):
        fdp.load_checkpoint(tmp_path, like={"w": torch.zeros(1000)})
    with pytest.raises(FileNotFoundError):
        fdp.load_checkpoint(tmp_path / "nowhere", like={})


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_loading_never_runs_code(tmp_path):
    evil = _Evil()
    evil.target = str(tmp_path / "pwned")
    torch.save({"format": ckpt.FORMAT, "paths": ["x"], "leaves": [evil]}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="holds more than tensors"):
        fdp.load_checkpoint(tmp_path, like={"w": torch.zeros(1)})
    assert not (tmp_path / "pwned").exists()


def test_damaged_table_and_plain_value_types(tmp_path):
    torch.save({"format": ckpt.FORMAT, "paths": "x", "leaves": []}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="table of entries is damaged"):
        fdp.load_checkpoint(tmp_path, like={})
    fdp.save_checkpoint(tmp_path, {"n": 1, "w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"state\['n'\] .* is int, expected str"):
        fdp.load_checkpoint(tmp_path, like={"n": "a", "w": torch.ones(2)})


def test_views_are_saved_without_their_base(tmp_path):
    base = torch.arange(10_000.0).view(100, 100)
    path = fdp.save_checkpoint(tmp_path, {"a": base[:2], "b": base[2:4]})
    assert path.stat().st_size < 20_000  # not the 40 kB base
    loaded = fdp.load_checkpoint(tmp_path, like={"a": base[:2], "b": base[2:4]})
    loaded["a"].add_(1)  # the loaded leaves do not share memory
    assert torch.equal(loaded["b"], base[2:4])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (until the OS reuses it)


def test_temp_files_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path):
    host = ckpt._host()
    dead = tmp_path / f".state.pt.{host}.{_dead_pid()}.abc.tmp"
    live = tmp_path / f".state.pt.{host}.{os.getppid()}.abc.tmp"  # a live process's save
    other_host = tmp_path / ".state.pt.elsewhere.1.abc.tmp"  # cannot tell: kept
    for temp in (dead, live, other_host):
        temp.write_bytes(b"partial")
    fdp.save_checkpoint(tmp_path, {"w": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other_host.name, "state.pt"])


def _states(n: int) -> list[dict]:
    return [{"w": torch.full((64, 64), float(i)), "step": torch.tensor(i)} for i in range(n)]


def test_concurrent_saves_into_one_folder_all_succeed(tmp_path):
    states = _states(4)
    errors: list[BaseException] = []

    def save_many(state: dict) -> None:
        try:
            for _ in range(15):
                fdp.save_checkpoint(tmp_path, state)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=save_many, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = fdp.load_checkpoint(tmp_path, like=states[0])
    assert any(torch.equal(loaded["w"], s["w"]) and torch.equal(loaded["step"], s["step"])
               for s in states)  # one state, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


_SAVER = """
import sys, torch, fdp
value = float(sys.argv[2])
for _ in range(20):
    fdp.save_checkpoint(sys.argv[1], {"w": torch.full((256, 256), value)})
"""


def test_concurrent_saves_from_processes_all_succeed(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), str(v)],
                              stderr=subprocess.PIPE, text=True) for v in (1, 2)]
    outputs = [p.communicate(timeout=120)[1] for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, outputs, strict=True)]
    assert all(code == 0 for code, _ in results), results
    w = fdp.load_checkpoint(tmp_path, like={"w": torch.zeros(256, 256)})["w"]
    assert torch.equal(w, torch.ones(256, 256)) or torch.equal(w, torch.full((256, 256), 2.0))


def test_a_checkpoint_file_path_works_for_save_and_load(tmp_path):
    state = {"w": torch.arange(3.0)}
    assert fdp.save_checkpoint(tmp_path / "run" / "model.pt", state) == tmp_path / "run" / \
        "model.pt"
    assert torch.equal(fdp.load_checkpoint(tmp_path / "run" / "model.pt", like=state)["w"],
                       state["w"])
    folder_file = fdp.save_checkpoint(tmp_path, state)  # the folder's state.pt
    assert torch.equal(fdp.load_checkpoint(folder_file, like=state)["w"], state["w"])
    fdp.save_checkpoint(folder_file, {"w": torch.ones(3)})  # over the existing file
    assert torch.equal(fdp.load_checkpoint(tmp_path, like=state)["w"], torch.ones(3))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*other\.pt"):
        fdp.load_checkpoint(tmp_path / "other.pt", like=state)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        fdp.save_checkpoint(3, state)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fdp.save_checkpoint(folder_file / "x.pt", state)


def test_meta_tensors_in_like_load_the_values_onto_the_cpu(tmp_path):
    state = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    fdp.save_checkpoint(tmp_path, state)
    like = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    loaded = fdp.load_checkpoint(tmp_path, like=like)
    assert all(loaded[k].device.type == "cpu" and torch.equal(loaded[k], state[k])
               for k in state)


_RESUME = """
import sys, torch, fdp
from tests.test_checkpoint import COMBOS, _setup_on, _run
folder, phase = sys.argv[1], sys.argv[2]
for name in COMBOS:
    model, optimizer, step, data = _setup_on(*COMBOS[name])
    start = fdp.TrainState.create(model.params, optimizer, seed=7)
    if phase == "first":
        fdp.save_checkpoint(f"{folder}/{name}", _run(step, start, data, 3))
    else:
        restored = fdp.load_checkpoint(f"{folder}/{name}", like=start)
        fdp.save_checkpoint(f"{folder}/{name}-end", _run(step, restored, data, 5))
"""

COMBOS = {f"{kind}-{str(dtype)[6:]}": (kind, dtype) for kind in ("vmap", "threads")
          for dtype in (torch.float32, torch.float64)}


def _setup_on(kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    model = fdp.functionalize(module)

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"])

    optimizer = fdp.optim.adam(fdp.optim.cosine_decay_schedule(1e-2, 20))
    mesh = fdp.Mesh(3) if kind == "vmap" else fdp.Mesh(devices=["cpu"] * 3)
    step = fdp.data_parallel_step(loss_fn, optimizer, mesh)
    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(50, 4, generator=g, dtype=dtype),
            "y": torch.randint(0, 3, (50,), generator=g)}
    return model, optimizer, step, data


def test_resuming_in_new_processes_is_bitwise_on_vmap_and_threads(tmp_path):
    """Each phase runs in a fresh process, so the resumed steps are that process's first
    calls (a threads mesh once differed there in float32)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for phase in ("first", "second"):
        out = subprocess.run([sys.executable, "-c", _RESUME, str(tmp_path), phase],
                             capture_output=True, text=True, timeout=300, env=env, cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
    for name, combo in COMBOS.items():
        model, optimizer, step, data = _setup_on(*combo)
        start = fdp.TrainState.create(model.params, optimizer, seed=7)
        straight = _run(step, start, data, 8)
        resumed = fdp.load_checkpoint(tmp_path / f"{name}-end", like=start)
        for a, b in zip(fdp.tree.flatten(resumed)[0], fdp.tree.flatten(straight)[0],
                        strict=True):
            assert torch.equal(a, b), name
