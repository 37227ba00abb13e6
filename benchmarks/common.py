"""Shared helpers for the benchmarks: timing with warm-up, medians, a consistent report line."""

from __future__ import annotations

import os
import statistics
import time

import torch

# CDM_BENCH_SMOKE=1: every benchmark runs once at its smallest size, so the test suite can check that it
# still runs (its figures then mean nothing).
SMOKE = os.environ.get("CDM_BENCH_SMOKE") == "1"


def timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after warm-up runs (one run, no warm-up, in smoke mode)."""
    if SMOKE:
        repeats, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def header(title: str) -> None:
    print(f"\n== {title} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
