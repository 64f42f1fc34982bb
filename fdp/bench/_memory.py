"""Peak-memory probe, run in a fresh subprocess per measurement (``python -m fdp.bench._memory``).

It warms the code paths up on a tiny batch (so lazy imports don't count), resets the kernel's RSS
high-water mark (``/proc/self/clear_refs``), runs one step on the full batch and reports the
process's peak RSS and the step's peak above the RSS before it, in MiB. Measuring the first
full-size step matters: later steps reuse memory the allocator kept, and would look free.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from fdp.bench import _models


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux); elsewhere the peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"{field}:\s+(\d+)", f.read())
        if found is None:
            raise OSError(f"no {field} in /proc/self/status")
        return int(found.group(1))
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # the peak then includes start-up; the ratio is still over the same work


def _make_step(workload: str, kind: str, n: int, batch: int) -> Any:
    w = _models.WORKLOADS[workload](batch)
    if kind == "plain":
        return _models.plain_step(w)
    return _models.functional_step(w) if kind == "functional" else _models.dp_step(w, n)


def _probe(workload: str, kind: str, n: int) -> dict[str, float]:
    _make_step(workload, kind, n, 2)()
    step = _make_step(workload, kind, n, _models.MEMORY_BATCH[workload])
    _reset_peak()
    before = _status_kib("VmRSS")
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
