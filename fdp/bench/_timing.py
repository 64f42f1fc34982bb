"""Interleaved timing: every candidate runs once per round, in a fresh random order, so drift
and the position in the round hit all of them alike. On a GPU, ``sync`` (``torch.cuda.synchronize``)
runs before the clock starts and before it stops, so that a time covers the kernels, not only
their launch."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any


def time_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3,
    sync: Callable[[], Any] | None = None,
) -> dict[str, dict[str, float]]:
    wait = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wait()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = fns[name]
            wait()
            start = time.perf_counter()
            fn()
            wait()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}
        for k, v in samples.items()
    }
