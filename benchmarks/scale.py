"""Big queues: submitting a million jobs from a file (W4), and what a job costs a worker when
the queue holds 1e3 to 1e6 of them (W5). Driven by run.py; no peers, absolute goals.

W4 times `jobfleet submit FILE` into an empty SQLite store, from launch to exit, and reads the
submitting process's peak resident memory from the kernel (wait4). The file is a CSV a user
would write: a command template and one parameter that differs on every row.

W5 builds, once per size N, a store whose queue holds N `true` jobs, then per repetition copies
it and lets one `jobfleet worker --slots 2 --max-jobs M` take the first M jobs; the throughput
is M over the span from the first job's recorded start to the M-th job's recorded end, so the
worker's interpreter start-up is left out. The per-job cost must not grow with N. The worker's
CPU time (with its jobs', from wait4) is reported too: it is less disturbed by a busy machine
than the wall time, so a cost that grows with N shows there first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import BenchmarkError, clean_env

#: W4's job file: a template and a parameter, as in the README
W4_HEADER = "command,sample\n"
W4_ROW = "process {{sample}},S{:07d}\n"
W5_COMMAND = "true"
W5_SLOTS = 2
TAIL = 3000


def write_job_file(path: Path, n: int) -> int:
    """A CSV of `n` jobs; returns its size in bytes."""
    with open(path, "w", buffering=1 << 20) as f:
        f.write(W4_HEADER)
        for i in range(1, n + 1):
            f.write(W4_ROW.format(i))
    return path.stat().st_size


def _wait_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float, float]:
    """Wait for `proc` (killing its group at `timeout`); (exit status, peak RSS in bytes, CPU
    seconds, user and system, of it and the children it waited for)."""
    timer = threading.Timer(timeout, lambda: _killpg(proc.pid))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux: ru_maxrss in kilobytes
    return proc.returncode, usage.ru_maxrss * 1024.0, usage.ru_utime + usage.ru_stime


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def submit_once(jobfleet: str, job_file: Path, n: int, scratch: Path, timeout: float
                ) -> dict[str, Any]:
    """One `jobfleet submit` of `job_file` into a fresh store; verified (n queued jobs)."""
    from jobfleet.store import open_store

    folder = Path(tempfile.mkdtemp(prefix="w4-", dir=scratch))
    store = folder / "jobfleet.db"
    argv = [jobfleet, "submit", str(job_file), "--store", str(store), "--blobs",
            str(folder / "blobs"), "--json"]
    try:
        with tempfile.TemporaryFile() as output:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, env=clean_env(),
                                    start_new_session=True)
            code, peak, _ = _wait_rusage(proc, timeout)
            seconds = time.perf_counter() - t0
            if code != 0:
                output.seek(0)
                tail = output.read()[-TAIL:].decode("utf-8", "replace")
                raise BenchmarkError(f"{' '.join(argv)} exited with status {code} (killed after "
                                     f"{timeout:.0f}s if -9):\n{tail}")
        with open_store(store) as db:
            runs = db.runs()
            counts = db.counts(runs[0].id) if len(runs) == 1 else {}
        if len(runs) != 1 or runs[0].total != n or counts.get("queued") != n:
            raise BenchmarkError(f"W4: after submitting {n} jobs the store holds {len(runs)} runs,"
                                 f" total {runs[0].total if runs else None}, counts {counts}")
        size = sum(p.stat().st_size for p in folder.glob("jobfleet.db*"))
        return {"seconds": seconds, "peak_rss": peak, "store_bytes": size}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarise_submit(samples: list[dict[str, Any]], n: int, file_bytes: int) -> dict[str, Any]:
    seconds = [s["seconds"] for s in samples]
    rss = [s["peak_rss"] for s in samples]
    median = statistics.median(seconds)
    return {"jobs": n, "file_bytes": file_bytes, "seconds": seconds, "median": median,
            "min": min(seconds), "jobs_per_second": n / median, "per_job_us": 1e6 * median / n,
            "peak_rss": rss, "peak_rss_median": statistics.median(rss),
            "peak_rss_max": max(rss), "store_bytes": samples[-1]["store_bytes"]}


# -- W5 -------------------------------------------------------------------------------------------


def build_queue(n: int, folder: Path) -> tuple[Path, str, float]:
    """A store holding one run of `n` queued `true` jobs, closed (WAL checkpointed);
    (its path, the run id, seconds it took)."""
    from jobfleet.spec import JobSpec
    from jobfleet.store import NewRun, open_store

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobfleet.db"
    t0 = time.perf_counter()
    with open_store(path) as db:
        run_id = db.submit(NewRun(name=f"queue-{n}", workdir=str(folder)),
                           [JobSpec(W5_COMMAND)] * n)
    return path, run_id, time.perf_counter() - t0


def drain_once(template: Path, run_id: str, n: int, take: int, scratch: Path, timeout: float
               ) -> dict[str, Any]:
    """A copy of the queue `template`; one worker takes its first `take` jobs and exits."""
    from jobfleet.store import open_store

    folder = Path(tempfile.mkdtemp(prefix=f"w5-{n}-", dir=scratch))
    store = folder / "jobfleet.db"
    try:
        shutil.copyfile(template, store)
        with open(store, "rb+") as f:  # on disk before the worker starts: no writeback then
            os.fsync(f.fileno())
        argv = [sys.executable, "-m", "jobfleet", "worker", "--slots", str(W5_SLOTS),
                "--max-jobs", str(take), "--run", run_id, "--idle-exit", "30"]
        env = clean_env() | {"JOBFLEET_STORE": str(store), "JOBFLEET_BLOBS": str(folder / "b")}
        with open(folder / "worker.log", "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            code, _, cpu = _wait_rusage(proc, timeout)
            wall = time.perf_counter() - t0
        if code != 0:
            tail = (folder / "worker.log").read_bytes()[-TAIL:].decode("utf-8", "replace")
            why = f"exited with {code} (-9: killed after {timeout:.0f}s)"
            raise BenchmarkError(f"W5: the worker on a queue of {n} {why}:\n{tail}")
        with open_store(store) as db:
            jobs = db.jobs(run_id, limit=take)
            counts = db.counts(run_id)
        done = [j for j in jobs if j.state == "succeeded" and j.exit_code == 0 and j.attempts == 1]
        if len(done) != take or counts["succeeded"] != take or counts["queued"] != n - take:
            raise BenchmarkError(f"W5: queue of {n}: expected the first {take} jobs succeeded "
                                 f"once and {n - take} queued; counts {counts}")
        first = min(j.started_at for j in done if j.started_at is not None)
        last = max(j.finished_at for j in done if j.finished_at is not None)
        return {"seconds": last - first, "jobs_per_second": take / (last - first),
                "worker_wall": wall, "worker_cpu": cpu}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarise_drain(samples: list[dict[str, Any]], take: int) -> dict[str, Any]:
    rates = [s["jobs_per_second"] for s in samples]
    median = statistics.median(rates)
    cpu = [s["worker_cpu"] for s in samples]
    return {"jobs_per_second": rates, "median": median, "per_job_ms": 1000 / median,
            "worker_wall": [s["worker_wall"] for s in samples], "worker_cpu": cpu,
            "worker_cpu_median": statistics.median(cpu), "taken": take}
