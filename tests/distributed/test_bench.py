"""The distributed and threads sections of ``python -m fdp.bench`` run and write their rows."""

from __future__ import annotations

import json

from fdp.bench.__main__ import main as bench_main


def test_bench_distributed_and_threads_sections(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_main(["--quick", "--rounds", "2", "--runs", "1", "--only", "distributed",
                       "--only", "threads", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    names = {r["name"] for r in rows}
    assert {r["measure"] for r in rows} == {"distributed", "threads"}
    assert any(n.endswith(": DDP") for n in names) and any(n.endswith(": fdp") for n in names)
    summary = [r for r in rows if r["name"].startswith("fdp step / DDP step")]
    assert len(summary) == 1 and summary[0]["ratio"] > 0 and len(summary[0]["runs"]) == 1


def test_bench_zero_section_measures_the_state_per_rank(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_main(["--quick", "--rounds", "2", "--only", "zero", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    memory = [r for r in rows if "opt_state_bytes_sharded" in r]
    assert len(memory) == 1  # --quick: N=2
    assert 0.49 < memory[0]["ratio"] < 0.51  # Adam's state: half per rank
    assert any(r["name"].endswith("sharded step") and r["median_ms"] > 0 for r in rows)
