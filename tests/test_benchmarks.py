"""The benchmarks keep running: each measuring entry point, once, on the shipped models (no timings asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_the_cascade_benchmark_measures_the_1024_stage():
    res = subprocess.run(
        [sys.executable, str(BENCH / "bench_cascade.py"), "mem", "0", "0"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["peak_rss_gib"] >= out["loaded_rss_gib"] > 0
