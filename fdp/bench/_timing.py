"""Interleaved timing: every candidate runs once per round, in a fresh random order, so drift
and the position in the round hit all of them alike."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any


def time_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}
        for k, v in samples.items()
    }
