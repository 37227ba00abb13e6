"""Run every benchmark in this folder; each prints ratios against a baseline measured in the same run."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

if __name__ == "__main__":
    only = sys.argv[1:]
    for name in ("bench_pipelines", "bench_train", "bench_cascade", "bench_upscale"):
        if not only or name in only:
            sys.argv = [str(HERE / f"{name}.py")]
            runpy.run_path(sys.argv[0], run_name="__main__")
