"""Peak-memory probe, run in a fresh subprocess per measurement (``python -m fdp.bench._memory``).

It builds the workload, runs the step once to warm up, resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), runs the step ``k`` times and reports the peak RSS and the peak
above the pre-step RSS, in MiB.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from fdp.bench import _models


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _probe(workload: str, kind: str, n: int, steps: int = 5) -> dict[str, float]:
    w = _models.WORKLOADS[workload]()
    step = _models.functional_step(w) if kind == "functional" else _models.dp_step(w, n)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    peak = _status_kib("VmHWM")
    return {"peak_rss_mib": peak / 1024, "step_peak_mib": (peak - before) / 1024}


def measure(workload: str, kind: str, n: int = 1) -> dict[str, Any]:
    """Runs :func:`_probe` in a new interpreter so that allocator state is not shared."""
    out = subprocess.run(
        [sys.executable, "-m", "fdp.bench._memory", workload, kind, str(n)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
