#!/usr/bin/env python3
"""Per-job overhead: jobfleet against GNU parallel and xargs, run in the same invocation.

Each tool runs the same N tiny shell jobs (`true`, and `sleep 0.01`) with the same number of
slots; the wall time of the whole user-visible command is timed from process start to exit.
Tools run interleaved (jobfleet, parallel, xargs, jobfleet, ...) so that noise on a shared
machine hits all of them alike, and the table reports medians. See benchmarks/README.md.

    python benchmarks/overhead.py [--jobs 2000] [--repeat 5] [--check-ratio 4.0]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import SUBJECT, BenchmarkError, clean_env, finish, machine, ratio_text

WORKLOADS = {"true": "true", "sleep": "sleep 0.01", "echo": "echo jobfleet-bench"}
#: what a workload prints: every attempt's log must hold exactly this (none: no log file)
OUTPUT = {"echo": b"jobfleet-bench\n"}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "overhead.json"
#: the reference that shows the floor of a runner written in Python (see find_floor)
FLOOR = "py-floor"
#: the peer and workload the project's target is stated against
TARGET_PEER, TARGET_WORKLOAD = "parallel", "true"
#: where the jobfleet wall time goes, in order; each is a span between two recorded instants
PHASES = ("startup", "jobs", "teardown")


@dataclass
class Tool:
    """One command line to time; `argv` gets the workload's files in `prepare`."""

    name: str
    exe: str | None  # None: not found, see skip_reason
    skip_reason: str | None = None
    version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    seconds: float  # wall time, launch to exit
    cpu: float  # user + system seconds of the command and every process it waited for
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Timing:
    seconds: float
    cpu: float
    launched: float  # time.time() at launch, to compare with instants other processes record


# -- finding the tools --------------------------------------------------------------------------


def _version(argv: Sequence[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else None


def find_jobfleet(given: str | None) -> Tool:
    """The `jobfleet` of the interpreter running this script (its store module verifies runs).

    That is the script next to sys.executable (what an activated venv puts first on PATH); a
    PATH lookup is the fallback. A pyenv shim on PATH would add a bash start to every run.
    """
    try:
        import jobfleet
    except ImportError as e:
        raise BenchmarkError(f"cannot import jobfleet with {sys.executable} ({e}); run this with "
                             "the Python jobfleet is installed in (pip install -e .)") from None
    beside = Path(sys.executable).parent / "jobfleet"
    exe = given or (str(beside) if beside.is_file() else shutil.which("jobfleet"))
    if exe is None:
        raise BenchmarkError("no `jobfleet` command next to this Python or on PATH; "
                             "install the project (pip install -e .) or pass --jobfleet PATH")
    package = Path(jobfleet.__file__).parent
    # An installed package has its bytecode; an editable one under PYTHONDONTWRITEBYTECODE
    # (set on this machine) would compile every module on every start. Compile once, as
    # `pip install` does.
    compileall.compile_dir(package, quiet=1)
    return Tool(SUBJECT, exe, version=jobfleet.__version__,
                details={"python": sys.executable, "module": str(package)})


def find_parallel(require: bool) -> Tool:
    exe = shutil.which("parallel")
    version = _version([exe, "--version"]) if exe else None
    reason = None
    if exe is None:
        reason = "`parallel` is not on PATH (apt-get install parallel)"
    elif not version or "GNU parallel" not in version:
        reason = f"{exe} is not GNU parallel ({version or 'no --version'})"
    if reason and require:
        raise BenchmarkError(f"--require-parallel: {reason}")
    return Tool("parallel", None if reason else exe, reason, version)


def find_xargs() -> Tool:
    exe, sh = shutil.which("xargs"), shutil.which("sh")
    if exe is None or sh is None:
        return Tool("xargs", None, f"`{'xargs' if exe is None else 'sh'}` is not on PATH")
    version = _version([exe, "--version"])
    # GNU xargs: -d '\n' takes each line whole (no quote processing); others: -I does lines
    gnu = bool(version and "GNU" in version)
    return Tool("xargs", exe, version=version or "unknown", details={"gnu": gnu})


def find_floor() -> Tool:
    """A reference, not a competitor: a bare Python loop that starts and waits for the jobs as
    jobfleet does, recording nothing (benchmarks/spawnfloor.py)."""
    script = Path(__file__).resolve().parent / "spawnfloor.py"
    return Tool(FLOOR, sys.executable, version=f"Python {sys.version.split()[0]}",
                details={"script": str(script)})


def argv_of(tool: Tool, slots: int, store: str = "<tmp>/jobfleet.db", blobs: str = "<tmp>/blobs"
            ) -> list[str]:
    """The command line of a tool; peers read one command per line on stdin."""
    assert tool.exe is not None
    if tool.name == SUBJECT:
        return [tool.exe, "run", "jobs.csv", "--slots", str(slots), "--store", store, "--blobs", blobs]
    if tool.name == "parallel":
        return [tool.exe, "--will-cite", "-j", str(slots)]
    if tool.name == FLOOR:
        return [tool.exe, str(tool.details["script"]), "--slots", str(slots)]
    if tool.name == "xargs":
        delim = ["-d", "\\n"] if tool.details.get("gnu") else []
        return [tool.exe, "-P", str(slots), *delim, "-I", "{}", "sh", "-c", "{}"]
    raise ValueError(tool.name)


# -- running ------------------------------------------------------------------------------------


def timed(argv: Sequence[str], *, cwd: Path, stdin: Path | None, timeout: float,
          on_timeout: Callable[[], None] = lambda: None) -> Timing:
    """Run to exit and time it; raises if it failed or took longer than `timeout`."""
    with (open(stdin, "rb") if stdin else open(os.devnull, "rb")) as f, \
            tempfile.TemporaryFile() as errors:
        before = _children_cpu()
        launched = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdin=f, stdout=subprocess.DEVNULL, stderr=errors,
                                env=clean_env(), start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            on_timeout()
            raise BenchmarkError(f"{' '.join(argv)} did not finish in {timeout:.0f}s") from None
        seconds = time.perf_counter() - t0
        cpu = _children_cpu() - before
        if code != 0:
            errors.seek(0)
            tail = errors.read()[-2000:].decode("utf-8", "replace")
            raise BenchmarkError(f"{' '.join(argv)} (in {cwd}) exited with status {code}:\n{tail}")
    return Timing(seconds, cpu, launched)


def _children_cpu() -> float:
    """CPU seconds of the waited-for children of this process (and theirs), so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_peer(tool: Tool, cmds: Path, slots: int, timeout: float) -> Sample:
    t = timed(argv_of(tool, slots), cwd=cmds.parent, stdin=cmds, timeout=timeout)
    return Sample(t.seconds, t.cpu)


def run_jobfleet(tool: Tool, workload: str, n: int, slots: int, scratch: Path, timeout: float
                 ) -> Sample:
    """One `jobfleet run` in a fresh folder (empty store), verified, then the folder removed."""
    assert tool.exe is not None
    folder = Path(tempfile.mkdtemp(prefix="jobfleet-", dir=scratch))
    try:
        with open(folder / "jobs.csv", "w") as f:
            f.write("command\n" + f"{WORKLOADS[workload]}\n" * n)
        store, blobs = folder / "store" / "jobfleet.db", folder / "store" / "blobs"
        argv = argv_of(tool, slots, str(store), str(blobs))
        t = timed(argv, cwd=folder, stdin=None, timeout=timeout,
                  on_timeout=lambda: kill_workers(store))
        return Sample(t.seconds, t.cpu,
                      verify_jobfleet(store, blobs, n, t.launched, t.launched + t.seconds,
                                      workload))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def kill_workers(store: Path) -> None:
    """After a timeout: the workers `run` started (own sessions) must not outlive it."""
    from jobfleet.store import open_store

    if not store.exists():
        return
    with open_store(store) as db:
        for w in db.workers():
            if w.host == socket.gethostname() and w.state != "stopped":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(w.pid, signal.SIGKILL)


def verify_jobfleet(store: Path, blobs: Path, n: int, launched: float, exited: float,
                    workload: str) -> dict[str, float]:
    """Check what the timing claims (n jobs, each run once, exit code 0, its output logged) and
    return where the wall time went, from the instants the store recorded."""
    from jobfleet.blobs import log_key
    from jobfleet.store import open_store

    def fail(what: str) -> BenchmarkError:
        return BenchmarkError(f"jobfleet run in {store.parent.parent}: {what}")

    if not store.is_file():
        raise fail(f"no store at {store}")
    with open_store(store) as db:
        runs = db.runs()
        if len(runs) != 1:
            raise fail(f"expected 1 run in a fresh store, found {len(runs)}")
        run = runs[0]
        counts = db.counts(run.id)
        jobs = db.jobs(run.id)
        workers = db.workers()
    if run.total != n or len(jobs) != n or counts["succeeded"] != n:
        raise fail(f"run {run.id}: expected {n} succeeded jobs, got total {run.total}, "
                   f"{len(jobs)} recorded, counts {counts}")
    if sorted(j.seq for j in jobs) != list(range(1, n + 1)):
        raise fail(f"run {run.id}: job numbers are not 1..{n}")
    bad = [j for j in jobs if j.state != "succeeded" or j.exit_code != 0 or j.attempts != 1
           or j.started_at is None or j.finished_at is None]
    if bad:
        j = bad[0]
        raise fail(f"{len(bad)} jobs not succeeded once with exit code 0, e.g. {j.id}: "
                   f"state {j.state}, exit code {j.exit_code}, attempts {j.attempts}")
    # a job that prints nothing leaves no log file; one that prints has exactly its output
    expected = OUTPUT.get(workload)
    with open_store(store) as db:
        for j in jobs:
            (attempt,) = db.attempts(j.key)
            path = blobs / log_key(run.id, j.seq, 1)
            if expected is None and (attempt.log is not None or path.exists()):
                raise fail(f"job {j.id} printed nothing but has a log {path}")
            if expected is not None and (attempt.log is None or not path.is_file()
                                         or path.read_bytes() != expected):
                raise fail(f"job {j.id}: log {path} missing or not {expected!r}")
    first = min(j.started_at for j in jobs if j.started_at is not None)
    last = max(j.finished_at for j in jobs if j.finished_at is not None)
    phases = {"startup": first - launched, "jobs": last - first, "teardown": exited - last,
              "submitted": run.created_at - launched}
    if workers:
        phases["worker_registered"] = min(w.started_at for w in workers) - launched
    return phases


# -- reporting ----------------------------------------------------------------------------------


def summarise(samples: list[Sample], n: int) -> dict[str, Any]:
    seconds = [s.seconds for s in samples]
    median = statistics.median(seconds)
    entry: dict[str, Any] = {"seconds": seconds, "median": median, "min": min(seconds),
                             "jobs_per_second": n / median,
                             "per_job_ms": 1000 * median / n,
                             "cpu_seconds": [s.cpu for s in samples],
                             "cpu_median": statistics.median(s.cpu for s in samples)}
    if samples and samples[0].phases:
        entry["phases"] = {k: [s.phases[k] for s in samples] for k in samples[0].phases}
        entry["phase_medians"] = {k: statistics.median(v) for k, v in entry["phases"].items()}
    return entry



def print_table(workload: str, command: str, result: dict[str, Any], n: int, repeat: int,
                slots: int) -> None:
    tools = result["tools"]
    print(f"\nworkload {workload!r} ({command}): {n} jobs, {slots} slots, "
          f"{repeat} interleaved run{'s' if repeat != 1 else ''} per tool")
    print(f"  {'tool':<10}{'median s':>10}{'min s':>10}{'jobs/s':>10}{'ms/job':>9}{'cpu s':>9}"
          "  vs jobfleet")
    base = tools[SUBJECT]["median"]
    for name, t in tools.items():
        vs = "" if name == SUBJECT else ratio_text(name, t["median"] / base)
        print(f"  {name:<10}{t['median']:>10.3f}{t['min']:>10.3f}{t['jobs_per_second']:>10.0f}"
              f"{t['per_job_ms']:>9.2f}{t['cpu_median']:>9.2f}  {vs}")
    ph = tools[SUBJECT].get("phase_medians")
    if ph:
        print(f"  where jobfleet's time goes (medians): startup {ph['startup']:.3f}s (launch to"
              f" first job started), jobs {ph['jobs']:.3f}s, teardown {ph['teardown']:.3f}s"
              " (last job finished to exit)")
        steps = [f"run submitted at +{ph['submitted']:.3f}s"]
        if "worker_registered" in ph:
            steps.append(f"worker registered at +{ph['worker_registered']:.3f}s")
        print(f"    within startup: {', '.join(steps)}")


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=2000, metavar="N", help="jobs per run [2000]")
    p.add_argument("--repeat", type=int, default=5, metavar="R", help="runs per tool [5]")
    p.add_argument("--slots", type=int, default=2, help="jobs at once, for every tool [2]")
    p.add_argument("--workloads", default="true,sleep",
                   help=f"comma-separated, of: {', '.join(WORKLOADS)} [true,sleep]")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results [benchmarks/results/overhead.json]")
    p.add_argument("--jobfleet", metavar="PATH", help="the jobfleet command to time")
    p.add_argument("--require-parallel", action="store_true",
                   help="a missing GNU parallel is an error, not a skip")
    p.add_argument("--check-ratio", type=float, metavar="X",
                   help=f"exit 1 unless {TARGET_PEER}/{SUBJECT} on {TARGET_WORKLOAD!r} is >= X")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="longest one run may take [60 + 0.2 s per job]")
    a = p.parse_args(argv)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    unknown = [w for w in a.workloads if w not in WORKLOADS]
    if unknown or not a.workloads:
        p.error(f"unknown workload {', '.join(unknown) or '(none)'}; choose from {', '.join(WORKLOADS)}")
    for name in ("jobs", "repeat", "slots"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.timeout is None:
        a.timeout = 60 + 0.2 * a.jobs
    return a


def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    tools = [find_jobfleet(a.jobfleet), find_parallel(a.require_parallel), find_xargs(),
             find_floor()]
    for t in tools:
        if t.skip_reason:
            print(f"skipping {t.name}: {t.skip_reason}")
    active = [t for t in tools if t.exe]
    report: dict[str, Any] = {
        "benchmark": "overhead",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"jobs": a.jobs, "repeat": a.repeat, "slots": a.slots,
                     "workloads": {w: WORKLOADS[w] for w in a.workloads}},
        "machine": machine(),
        "tools": {t.name: {"path": t.exe, "version": t.version, **t.details,
                           **({"argv": argv_of(t, a.slots)} if t.exe else {}),
                           **({"skipped": t.skip_reason} if t.skip_reason else {})}
                  for t in tools},
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="jobfleet-bench-") as tmp:
        scratch = Path(tmp)
        for workload in a.workloads:
            command = WORKLOADS[workload]
            cmds = scratch / f"{workload}.txt"
            cmds.write_text(f"{command}\n" * a.jobs)
            samples: dict[str, list[Sample]] = {t.name: [] for t in active}
            for rep in range(1, a.repeat + 1):
                for t in active:
                    if t.name == SUBJECT:
                        s = run_jobfleet(t, workload, a.jobs, a.slots, scratch, a.timeout)
                    else:
                        s = run_peer(t, cmds, a.slots, a.timeout)
                    samples[t.name].append(s)
                    print(f"  {workload} {rep}/{a.repeat} {t.name:<9} {s.seconds:8.3f}s"
                          f" (cpu {s.cpu:.2f}s)",
                          file=sys.stderr, flush=True)
            result: dict[str, Any] = {
                "command": command,
                "tools": {name: summarise(ss, a.jobs) for name, ss in samples.items()},
            }
            base = result["tools"][SUBJECT]["median"]
            result["ratios"] = {f"{name}/{SUBJECT}": t["median"] / base
                                for name, t in result["tools"].items() if name != SUBJECT}
            report["results"][workload] = result
            print_table(workload, command, result, a.jobs, a.repeat, a.slots)
    report["machine"]["load_average_end"] = os.getloadavg()
    return report


def check_ratio(report: dict[str, Any], target: float) -> tuple[bool, str]:
    key = f"{TARGET_PEER}/{SUBJECT}"
    result = report["results"].get(TARGET_WORKLOAD)
    if result is None:
        return False, f"--check-ratio: the {TARGET_WORKLOAD!r} workload was not run"
    if key not in result["ratios"]:
        why = report["tools"][TARGET_PEER].get("skipped", "it did not run")
        return False, f"--check-ratio: no {key} ratio, {TARGET_PEER} was skipped: {why}"
    ratio = result["ratios"][key]
    if ratio < target:
        return False, (f"--check-ratio: {ratio_text(TARGET_PEER, ratio)} on {TARGET_WORKLOAD!r} "
                       f"is below the target {target:g}x (jobfleet median "
                       f"{result['tools'][SUBJECT]['median']:.3f}s, {TARGET_PEER} median "
                       f"{result['tools'][TARGET_PEER]['median']:.3f}s)")
    return True, f"--check-ratio: {ratio_text(TARGET_PEER, ratio)} meets the target {target:g}x"


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    return finish(a, benchmark, check_ratio)


if __name__ == "__main__":
    sys.exit(main())
