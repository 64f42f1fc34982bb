"""``python -m fdp.bench --device cuda`` and ``scripts/device-check.sh``: without CUDA the bench
refuses clearly; its GPU code runs here on the CPU (the device and process-group backend are
arguments), so that a GPU run only meets CUDA itself."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from fdp.bench import _cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device-check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_device_cuda_without_cuda_fails_with_the_cause():
    out = subprocess.run([sys.executable, "-m", "fdp.bench", "--device", "cuda", "--quick"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out
    assert "--device cuda: CUDA is not available" in out.stderr, out.stderr
    assert "CUDA build of torch" in out.stderr and "FDP_TORCH_INDEX_URL" in out.stderr
    assert out.stdout == "", out.stdout  # no table of CPU numbers passed off as GPU ones


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_device_check_script_is_valid_bash():
    assert SCRIPT.exists()
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    text = SCRIPT.read_text()
    for stage in ("tests/test_cuda.py", "--device cuda", "timeout", "OUT", "SUMMARY"):
        assert stage in text, stage


def test_the_gpu_sections_run_on_the_cpu():
    table: list = []
    cpu = torch.device("cpu")
    _cuda.bench_steps(["mlp"], 2, [2], table, cpu)
    names = [r["name"] for r in table]
    assert any("plain module" in n for n in names) and any("fdp DP N=2" in n for n in names)
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in table)


def test_the_gpu_distributed_section_runs_on_one_gloo_rank(tmp_path):
    """In a fresh process: it creates and destroys a process group of its own."""
    path = tmp_path / "rows.json"
    code = ("import json, sys, torch; from fdp.bench import _cuda; t = []; "
            "_cuda.bench_distributed(2, t, torch.device('cpu'), 'gloo'); "
            "json.dump(t, open(sys.argv[1], 'w'))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {r["name"].split(": ")[-1]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"DDP", "fdp", "DDP fwd+bwd", "fdp value_and_grad"}
    assert rows["fdp"]["ratio"] > 0 and rows["fdp value_and_grad"]["ratio"] > 0
