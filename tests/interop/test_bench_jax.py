"""``python -m fdp.bench --only jax`` runs and reports ratios (numbers reported, not asserted)."""

from __future__ import annotations

import json

import pytest

from fdp.bench.__main__ import main as bench_main

jax = pytest.importorskip("jax")


@pytest.mark.slow
def test_bench_jax_section_writes_ratios(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_main(["--quick", "--rounds", "2", "--only", "jax", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    rows = {r["name"].split(": ", 1)[-1]: r for r in data["results"]}
    assert {r["measure"] for r in data["results"]} == {"jax"}
    assert rows["compiled fdp DP N=8"]["ratio"] > 0 and rows["fdp DP / JAX vmap+pmean"]["ratio"] > 0
    diff = next(r["max_relative_grad_difference"] for r in data["results"]
                if "max_relative_grad_difference" in r)
    assert diff < 1e-4  # float32: fdp's and JAX's gradients of the same MLP agree
    assert data["meta"]["jax"] == jax.__version__
