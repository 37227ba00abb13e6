"""Shared helpers for the benchmarks: timing with warm-up, medians, a consistent report line."""

from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after warm-up runs."""
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
