#!/usr/bin/env python3
"""What a sandbox costs: jobs per second on `true` through `jobfleet run --sandbox NAME`.

Each sandbox (process, the default, and bwrap, when bubblewrap is installed; also `process`
with a memory limit, which starts each job through the control-group trampoline) runs the same
N `true` jobs with the same slots, interleaved so noise on a shared machine hits them alike;
the table reports medians of the wall time from launch to exit and the ratio to `process`.

    python benchmarks/sandbox.py [--jobs 1000] [--repeat 3] [--slots 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BenchmarkError, clean_env, finish, machine

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "sandbox.json"
#: variant name -> (sandbox, extra job-file columns)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "process": ("process", {}),
    "process+memory": ("process", {"memory": "1GiB"}),
    "bwrap": ("bwrap", {}),
}
BASELINE = "process"


def one_run(variant: str, jobs: int, slots: int, timeout: float) -> float:
    """Seconds `jobfleet run` takes for `jobs` `true` jobs in the variant's sandbox."""
    sandbox, columns = VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="jobfleet-bench-sandbox-") as tmp:
        folder = Path(tmp)
        header = ["command", *columns]
        lines = [",".join(header)] + [",".join(["true", *columns.values()])] * jobs
        (folder / "jobs.csv").write_text("\n".join(lines) + "\n")
        env = clean_env() | {"JOBFLEET_STORE": str(folder / "s.db"),
                             "JOBFLEET_BLOBS": str(folder / "blobs")}
        began = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "jobfleet", "run", "jobs.csv", "--slots",
                            str(slots), "--sandbox", sandbox], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        took = time.perf_counter() - began
    if p.returncode != 0:
        raise BenchmarkError(f"{variant}: jobfleet run exited {p.returncode}: "
                             f"{(p.stderr or p.stdout).strip()[-400:]}")
    return took


def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    variants = [v for v in VARIANTS if v != "bwrap" or shutil.which("bwrap")]
    skipped = {} if "bwrap" in variants else {"bwrap": "bubblewrap is not installed"}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(a.repeat):
        for v in variants:
            t = one_run(v, a.jobs, a.slots, a.timeout)
            times[v].append(t)
            print(f"  {r + 1}/{a.repeat} {v:<15} {t:7.3f}s", flush=True)
    base = statistics.median(times[BASELINE])
    print(f"\n`true` x {a.jobs}, {a.slots} slots, {a.repeat} interleaved runs per sandbox")
    print(f"  {'sandbox':<15} {'median s':>9} {'jobs/s':>8} {'ms/job':>7}  vs process")
    results = {}
    for v in variants:
        median = statistics.median(times[v])
        results[v] = {"seconds": times[v], "median": median, "jobs_per_second": a.jobs / median,
                      "ms_per_job": 1000 * median / a.jobs, "vs_process": median / base}
        print(f"  {v:<15} {median:9.3f} {a.jobs / median:8.0f} {1000 * median / a.jobs:7.2f}"
              f"  {median / base:.2f}x")
    for v, why in skipped.items():
        print(f"  {v:<15} skipped: {why}")
    return {"benchmark": "sandbox", "jobs": a.jobs, "slots": a.slots, "repeat": a.repeat,
            "machine": machine(), "results": results, "skipped": skipped}


def check_ratio(report: dict[str, Any], limit: float) -> tuple[bool, str]:
    bwrap = report["results"].get("bwrap")
    if bwrap is None:
        return False, "bwrap was skipped: no ratio to check"
    ok = bwrap["vs_process"] <= limit
    return ok, f"bwrap/process time = {bwrap['vs_process']:.2f}x ({'<=' if ok else '>'} {limit})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1000, metavar="N", help="jobs per run [1000]")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="runs per sandbox [3]")
    p.add_argument("--slots", type=int, default=2, help="jobs at once [2]")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results [benchmarks/results/sandbox.json]")
    p.add_argument("--check-ratio", type=float, default=None, metavar="X",
                   help="exit 1 unless bwrap takes at most X times as long as process")
    p.add_argument("--timeout", type=float, default=600, metavar="S",
                   help="longest one run may take [600]")
    return finish(p.parse_args(), benchmark, check_ratio)


if __name__ == "__main__":
    sys.exit(main())
