"""The benchmarks keep running: each measuring entry point, once, on the shipped models (no timings asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_the_cascade_benchmark_measures_the_1024_stage():
    res = subprocess.run(
        [sys.executable, str(BENCH / "bench_cascade.py"), "mem", "now"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["peak_rss_gib"] >= out["loaded_rss_gib"] > 0


@pytest.mark.slow  # about a minute on 2 cores; CI runs make test-slow too
def test_every_benchmark_runs_in_smoke_mode():
    """`make bench`'s own entry point, each benchmark once at its smallest size: a change that breaks a
    benchmark fails here (the figures of a smoke run are not looked at)."""
    res = subprocess.run(
        [sys.executable, str(BENCH / "run.py")],
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "CDM_BENCH_SMOKE": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for line in (
        "base64     pipeline",
        "sr64to256  pipeline",
        "precision=no ",
        "precision=bf16",
        "train.mixed_precision=auto",
        "before  base64",
        "now     base64",
        "quality sr256to1024 now",
        "one 64x48 photo",  # the smoke run's stand-in for the 1024x768 photo
        "quality now seed 0",
    ):
        assert line in res.stdout, res.stdout
