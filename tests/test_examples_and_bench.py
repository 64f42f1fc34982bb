"""The README's example and the benchmark CLI run (numbers are reported, not asserted)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

from fdp.bench.__main__ import main as bench_main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_matches_single_device():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    diffs = [float(x) for x in re.findall(r"max \|grad difference\| = ([0-9.e+-]+)", out)]
    assert len(diffs) == 2 and all(d < 1e-5 for d in diffs), out


def test_bench_quick_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_main(["--quick", "--rounds", "2", "--workload", "mlp", "--only", "eager",
                       "--only", "sweep", "--only", "memory", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    measures = {row["measure"] for row in data["results"]}
    assert measures == {"eager", "sweep", "memory"}
    dp_rows = [r for r in data["results"] if "fdp DP" in r["name"]]
    assert dp_rows and all(r["ratio"] > 0 for r in dp_rows)
    assert data["meta"]["torch"] == __import__("torch").__version__


def test_bench_donate_section_compares_every_mode_with_torch_optim(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_main(["--quick", "--rounds", "2", "--only", "donate", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert {r["measure"] for r in rows} == {"donate"}
    for mode in ("none", "auto", "state"):
        mine = [r for r in rows if r["name"].endswith(f"donate={mode}")]
        assert len(mine) == 3 and all(r["ratio"] > 0 for r in mine)  # sgd, adam, step


def test_digits_example_trains_both_runs_to_the_same_place(tmp_path):
    png = tmp_path / "loss.png"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"),
                          "--out", str(png)], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    accuracies = [float(x) for x in re.findall(r"(?:data-parallel|single device) ([0-9.]+)",
                                               out)]
    diff = float(re.search(r"max \|parameter difference\| = ([0-9.e+-]+)", out).group(1))
    assert len(accuracies) == 2 and min(accuracies) >= 0.95, out
    assert diff < 1e-5, out  # float32, SGD: the same run up to summation order (seen: 2.4e-7)
    assert png.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()}) > 20
