"""Batch engine benchmark (issue 6): N phantom cases, `perfusion batch --jobs 1` (in-process) vs
`--jobs 2` (a Dask LocalCluster of two single-threaded worker processes), each as a fresh command.

Reported: wall time of each, the speed-up, and the engine's overhead per case:
(jobs x wall - sum of the cases' own analysis seconds) / N, which charges the cluster start-up, task
shipping and the summary to the cases. A warm-up batch runs first so numba's caches (in-process:
__pycache__; workers: the per-user NUMBA_CACHE_DIR) hold compiled kernels, as on any machine after the
first run. Not a test: run `python benchmarks/bench_batch.py [--cases 16] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_cases(root: Path, n: int) -> None:
    from perfusion.io import staged_output
    from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

    root.mkdir(parents=True)
    for i in range(n):
        with staged_output(root / f"case{i:02d}", force=False) as stage:
            write_phantom(make_phantom(PhantomSpec(seed=i)), stage)


def run(root: Path, out: Path, jobs: int, env: dict | None = None) -> tuple[float, float]:
    """Wall seconds of one batch command and the sum of its cases' own seconds."""
    import os

    perfusion = Path(sys.executable).parent / "perfusion"
    t0 = time.perf_counter()
    subprocess.run([str(perfusion), "batch", str(root), str(out), "--jobs", str(jobs), "-q"], check=True,
                   env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    per_case = {r["case"]: float(r["seconds"]) for r in rows}
    return wall, sum(per_case.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the median is reported")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="perfusion-bench-batch-"))
    try:
        make_cases(tmp / "in", args.cases)
        warm = tmp / "warm"
        warm.mkdir()
        for i in range(2):
            shutil.copytree(tmp / "in" / f"case{i:02d}", warm / f"case{i:02d}")
        for jobs in (1, 2):
            run(warm, tmp / f"warm-out-{jobs}", jobs)
        # "1t": --jobs 1 with numba and BLAS on one thread, the single-core baseline; plain --jobs 1
        # lets numba's parallel kernels and BLAS use both cores inside each case
        single = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        settings = {"1": (1, None), "1t": (1, single), "2": (2, None)}
        results = {}
        for name, (jobs, env) in settings.items():
            runs = []
            for r in range(args.repeats):
                out = tmp / f"out-{name}-{r}"
                runs.append(run(tmp / "in", out, jobs, env))
                shutil.rmtree(out)
            runs.sort()
            wall, busy = runs[len(runs) // 2]
            results[name] = {"jobs": jobs, "threads_bounded": env is not None, "wall_s": wall,
                             "case_seconds_sum": busy, "overhead_per_case_s": (jobs * wall - busy) / args.cases}
        speedup = results["1"]["wall_s"] / results["2"]["wall_s"]
        speedup_1t = results["1t"]["wall_s"] / results["2"]["wall_s"]
        report = {"cases": args.cases, "runs": results, "speedup_2_vs_1": speedup,
                  "speedup_2_vs_1_one_thread": speedup_1t}
        print(f"{args.cases} phantom cases (64 x 64 x 5 x 80), median of {args.repeats} runs each")
        labels = {"1": "--jobs 1", "1t": "--jobs 1, one thread", "2": "--jobs 2"}
        for name, r in results.items():
            print(f"  {labels[name]:22s} wall {r['wall_s']:6.1f} s, cases' own time {r['case_seconds_sum']:6.1f} s, "
                  f"engine overhead {r['overhead_per_case_s']:.2f} s/case")
        print(f"  speed-up --jobs 2 vs --jobs 1: {speedup:.2f}x; vs --jobs 1 on one thread: {speedup_1t:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
