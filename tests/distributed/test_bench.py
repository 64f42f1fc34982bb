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
