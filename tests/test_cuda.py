"""The vmap backend on a GPU gives the CPU's numbers, and ``python -m fdp.bench --device cuda``
runs. Skipped without CUDA (as in CI); ``scripts/device-check.sh`` runs them on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fdp
from tests.helpers import F64_REL, assert_close

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("split", ["chunk", "even", [5, 0, 3, 2]])
def test_value_and_grad_on_cuda_matches_cpu(split):
    module = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    batch = {"x": torch.randn(10, 6, dtype=torch.float64), "y": torch.randint(0, 4, (10,))}

    def run(device):
        model = fdp.functionalize(module.to(device))

        def loss_fn(p, b):
            return nn.functional.cross_entropy(model.apply(p, model.buffers, b["x"])[0], b["y"])

        on_device = {k: v.to(device) for k, v in batch.items()}
        mesh = fdp.Mesh(4, device=device)
        return fdp.value_and_grad(loss_fn, mesh, split=split)(model.params, on_device)

    loss_gpu, grads_gpu = run("cuda")
    loss_cpu, grads_cpu = run("cpu")
    assert grads_gpu["0.weight"].is_cuda
    assert_close(loss_gpu.cpu(), loss_cpu, F64_REL)
    assert_close({k: g.cpu() for k, g in grads_gpu.items()}, grads_cpu, F64_REL)


def test_pmap_collectives_and_masks_on_cuda():
    mesh = fdp.Mesh(3, device="cuda")
    x = torch.arange(7.0, device="cuda")
    sharded = fdp.scatter(x, mesh)
    assert sharded.mask.is_cuda and sharded.counts.is_cuda
    total = fdp.pmap(lambda v, m: fdp.psum((v * m).sum(), "dp"), mesh, out_axes=None)(
        sharded, sharded.mask)
    assert total.item() == x.sum().item()
    assert torch.equal(fdp.gather(sharded, mesh), x)


def test_bench_device_cuda_quick_runs(tmp_path):
    """Every GPU section (in a fresh process: it creates a 1-rank NCCL group of its own)."""
    path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "fdp.bench", "--device", "cuda", "--quick",
                          "--rounds", "2", "--workload", "mlp", "--json", str(path)],
                         capture_output=True, text=True, timeout=400,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-4000:]
    data = json.loads(path.read_text())
    assert data["meta"]["device"] == "cuda" and data["meta"]["gpu"]
    measures = {r["measure"] for r in data["results"]}
    assert measures == {"eager", "sweep", "compile", "memory", "distributed"}, measures
    assert all(r["ratio"] > 0 for r in data["results"] if r.get("ratio") is not None)
