#!/usr/bin/env python3
"""Store throughput and submit-to-start latency: SQLite beside PostgreSQL, in one invocation.

Throughput: N `true` jobs are submitted at once to a fresh store and run by W `jobfleet worker`
processes (2 slots each); the time from the submit call to the moment the store counts every
job finished is measured for SQLite with 1 worker (the embedded default, the reference) and
PostgreSQL with 2 and 4 workers, interleaved and repeated, and the table reports medians.

Latency: one `true` job at a time is submitted to an idle, running worker; the latency is the
attempt's recorded start (the worker's clock, once the process really started) minus the time
just before the submit call. Both stores are sampled alternately; medians and p90s are checked
against the project's targets. See benchmarks/README.md.

    python benchmarks/fleet.py [--jobs 2000] [--repeat 3] [--workers 2,4] [--latency-samples 30]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from common import BenchmarkError, clean_env, finish, machine

if TYPE_CHECKING:  # jobfleet is imported where used: a missing install is a clear error
    from jobfleet.store import Store

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "fleet.json"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
#: the reference every throughput is compared with
REFERENCE = "sqlite-1"
SLOTS = 2
COMMAND = "true"
#: how often the benchmark looks at the store's counts while jobs run, seconds
POLL = 0.01
#: a latency sample starts only after its worker has been idle this long, at least
IDLE_BEFORE = 1.0
#: the random pause between two latency submissions, seconds
PAUSE = (0.2, 0.6)
#: how long workers get to register, and to exit after SIGTERM before they are killed
WORKER_START_WITHIN = 60.0
WORKER_STOP_WITHIN = 15.0
#: a worker left behind by a benchmark that was itself killed exits after this long idle
WORKER_IDLE_EXIT = 60
#: the targets: (store, median latency under, ms, where the target was set)
TARGETS = (("sqlite", 3.0, "issue 9"), ("postgres", 10.0, "issue 9"), ("postgres", 20.0, "issue 4"))
TAIL = 3000


@dataclass(frozen=True)
class Config:
    store: str  # sqlite or postgres
    workers: int

    @property
    def name(self) -> str:
        return f"{self.store}-{self.workers}"


@dataclass
class Sample:
    seconds: float  # submit call to the poll that saw every job finished
    phases: dict[str, float]  # instants the store recorded, relative to the submit call
    jobs_per_worker: list[int] = field(default_factory=list)


# -- stores ---------------------------------------------------------------------------------------


def probe_postgres(url: str) -> tuple[str | None, str | None]:
    """(server version, None) when a database can be created at `url`, else (None, why not)."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[dev]' or 'jobfleet[postgres]')"
    from jobfleet.store.urls import conninfo, masked

    try:
        with psycopg.connect(conninfo(url), autocommit=True, connect_timeout=5) as c:
            row = c.execute("SELECT current_setting('server_version'),"
                            " rolcreatedb OR rolsuper FROM pg_roles"
                            " WHERE rolname = current_user").fetchone()
    except psycopg.Error as e:
        why = " ".join(str(e).split()).removeprefix("connection failed: ")
        return None, f"cannot connect to {masked(url)}: {why}"
    if row is None or not row[1]:
        return None, f"the user of {masked(url)} may not create databases"
    return str(row[0]), None


@contextlib.contextmanager
def fresh_postgres(server: str) -> Iterator[str]:
    """A new, empty database on the server `server` points to, dropped afterwards; its URL."""
    import psycopg
    from psycopg import sql

    from jobfleet.store.urls import conninfo

    name = f"jobfleet_bench_{secrets.token_hex(4)}"
    with psycopg.connect(conninfo(server), autocommit=True, connect_timeout=5) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        # FORCE: a connection still open (a worker that had to be killed) must not keep it
        with psycopg.connect(conninfo(server), autocommit=True, connect_timeout=5) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@contextlib.contextmanager
def fresh_store(kind: str, folder: Path, pg: str) -> Iterator[str]:
    """The URL of an empty store of `kind`: a SQLite file in `folder`, or a new database."""
    if kind == "sqlite":
        yield str(folder / "jobfleet.db")
    else:
        with fresh_postgres(pg) as url:
            yield url


# -- workers --------------------------------------------------------------------------------------


def worker_argv() -> list[str]:
    return [sys.executable, "-m", "jobfleet", "worker", "--slots", str(SLOTS),
            "--idle-exit", str(WORKER_IDLE_EXIT)]


@contextlib.contextmanager
def running_workers(n: int, store: Store, url: str, blobs: Path, folder: Path
                    ) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` worker processes on the store at `url`, registered in it; stopped on the way out.

    The store's URL goes in the environment (JOBFLEET_STORE), not on the command line, where
    a password would show in `ps`.
    """
    env = clean_env() | {"JOBFLEET_STORE": url, "JOBFLEET_BLOBS": str(blobs)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            with open(folder / f"worker-{i + 1}.log", "wb") as out:
                procs.append(subprocess.Popen(worker_argv(), cwd=folder, env=env,
                                              stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        wait_registered(store, procs, folder)
        yield procs
    finally:
        killed = stop_workers(procs)
        if killed:
            print(f"warning: {len(killed)} worker(s) did not exit {WORKER_STOP_WITHIN:.0f}s after "
                  f"SIGTERM and were killed (pids {', '.join(map(str, killed))})",
                  file=sys.stderr)


def wait_registered(store: Store, procs: list[subprocess.Popen[bytes]], folder: Path) -> None:
    pids = {p.pid for p in procs}
    deadline = time.monotonic() + WORKER_START_WITHIN
    while True:
        up = {w.pid for w in store.workers() if w.state == "running"} & pids
        if len(up) == len(pids):
            return
        for p in procs:
            if p.poll() is not None:
                raise BenchmarkError(f"worker {p.pid} exited with status {p.returncode} before "
                                     f"it registered; its output:\n{worker_output(folder)}")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{len(pids) - len(up)} of {len(pids)} workers did not register "
                                 f"in {WORKER_START_WITHIN:.0f}s; output:\n{worker_output(folder)}")
        time.sleep(POLL)


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM (a drain: an idle worker exits at once), then SIGKILL at the deadline; returns
    the pids that had to be killed. Every worker has exited when this returns."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + WORKER_STOP_WITHIN
    killed = []
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the worker's group
            p.wait()
            killed.append(p.pid)
    return killed


def worker_output(folder: Path) -> str:
    parts = [f"--- {f.name}\n{f.read_bytes()[-TAIL:].decode('utf-8', 'replace')}"
             for f in sorted(folder.glob("worker-*.log"))]
    return "\n".join(parts) or "(none)"


# -- throughput -----------------------------------------------------------------------------------


def run_throughput(cfg: Config, n: int, scratch: Path, pg: str, timeout: float) -> Sample:
    """One run: a fresh store and blob folder, `cfg.workers` registered workers, then N jobs
    submitted at once and timed until the store counts them all finished; verified."""
    from jobfleet.spec import JobSpec
    from jobfleet.store import NewRun, open_store

    folder = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=scratch))
    jobs = [JobSpec(COMMAND)] * n
    try:
        with fresh_store(cfg.store, folder, pg) as url, open_store(url) as store:
            with running_workers(cfg.workers, store, url, folder / "blobs", folder) as procs:
                t0 = time.time()
                run_id = store.submit(NewRun(name=f"bench-{cfg.name}", workdir=str(folder)), jobs)
                submitted = time.time()
                seconds = wait_finished(store, run_id, n, procs, t0 + timeout, cfg.name,
                                        folder) - t0
            phases = verify(store, run_id, n, cfg.name, t0)
            phases["submit"] = submitted - t0
            # the workers have stopped, and recorded how many jobs each finished
            shares = sorted((w.jobs_done for w in store.workers()), reverse=True)
        return Sample(seconds, phases, shares)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait_finished(store: Store, run_id: str, n: int, procs: list[subprocess.Popen[bytes]],
                  deadline: float, name: str, folder: Path) -> float:
    """Poll the store's counts until all `n` jobs are in a final state; the time it saw so."""
    from jobfleet.store import TERMINAL

    while True:
        counts = store.counts(run_id)
        if sum(counts[s] for s in TERMINAL) >= n:
            return time.time()
        if time.time() > deadline:
            raise BenchmarkError(f"{name}: {n} jobs not finished in time (counts {counts}); "
                                 f"worker output:\n{worker_output(folder)}")
        if any(p.poll() is not None for p in procs):
            raise BenchmarkError(f"{name}: a worker exited while jobs were left (counts "
                                 f"{counts}); worker output:\n{worker_output(folder)}")
        time.sleep(POLL)


def verify(store: Store, run_id: str, n: int, name: str, t0: float) -> dict[str, float]:
    """Every job succeeded exactly once, with exit code 0; returns the recorded instants."""
    counts = store.counts(run_id)
    jobs = store.jobs(run_id)
    if counts["succeeded"] != n or len(jobs) != n:
        raise BenchmarkError(f"{name}: run {run_id}: expected {n} succeeded jobs, got counts "
                             f"{counts} ({len(jobs)} recorded)")
    bad = [j for j in jobs if j.attempts != 1 or j.exit_code != 0 or j.started_at is None
           or j.finished_at is None]
    if bad:
        j = bad[0]
        raise BenchmarkError(f"{name}: {len(bad)} jobs did not succeed exactly once, e.g. {j.id}:"
                             f" {j.attempts} attempts, exit code {j.exit_code}")
    return {"first_started": min(j.started_at for j in jobs) - t0,
            "last_finished": max(j.finished_at for j in jobs) - t0}


def summarise_throughput(cfg: Config, samples: list[Sample], n: int) -> dict[str, Any]:
    seconds = [s.seconds for s in samples]
    median = statistics.median(seconds)
    phases = {k: [s.phases[k] for s in samples] for k in samples[0].phases}
    return {"store": cfg.store, "workers": cfg.workers, "slots_per_worker": SLOTS,
            "seconds": seconds, "median": median, "min": min(seconds),
            "jobs_per_second": n / median, "phases": phases,
            "phase_medians": {k: statistics.median(v) for k, v in phases.items()},
            "jobs_per_worker": [s.jobs_per_worker for s in samples]}


def print_throughput(result: dict[str, Any], n: int, repeat: int) -> None:
    configs = result["configurations"]
    print(f"\nthroughput: {n} `{COMMAND}` jobs submitted at once, {SLOTS} slots per worker, "
          f"{repeat} interleaved run{'s' if repeat != 1 else ''} per configuration")
    print(f"  {'configuration':<15}{'workers':>8}{'median s':>10}{'min s':>9}{'jobs/s':>9}"
          f"  {'vs ' + REFERENCE:<12}{'submit s':>9}{'1st start':>10}{'last end':>9}")
    for name, c in configs.items():
        ratio = result["ratios"].get(f"{name}/{REFERENCE}")
        vs = f"{ratio:.2f}x" if ratio is not None else ""
        ph = c["phase_medians"]
        print(f"  {name:<15}{c['workers']:>8}{c['median']:>10.3f}{c['min']:>9.3f}"
              f"{c['jobs_per_second']:>9.0f}  {vs:<12}{ph['submit']:>9.3f}"
              f"{ph['first_started']:>10.3f}{ph['last_finished']:>9.3f}")
    print("  (vs sqlite-1: jobs/s over sqlite-1's; submit, 1st start and last end: medians of "
          "the instants recorded, seconds after the submit call began)")


# -- latency --------------------------------------------------------------------------------------


def latency_sample(store: Store, folder: Path) -> tuple[float, float]:
    """Submit one job to an idle worker and wait for it to end; (latency, submit call) in ms."""
    from jobfleet.spec import JobSpec
    from jobfleet.store import NewRun, job_id

    before = time.time()
    run_id = store.submit(NewRun(name="latency", workdir=str(folder)), [JobSpec(COMMAND)])
    returned = time.time()
    deadline = returned + 30.0
    while store.pending(run_id) != 0:
        if time.time() > deadline:
            raise BenchmarkError(f"{store.url}: a single job did not finish within 30 s; worker "
                                 f"output:\n{worker_output(folder)}")
        time.sleep(POLL)
    job = store.job(job_id(run_id, 1))
    attempts = store.attempts(job.key)
    if job.state != "succeeded" or len(attempts) != 1 or attempts[0].started_at is None:
        raise BenchmarkError(f"{store.url}: job {job.id} {job.state} after {len(attempts)} "
                             f"attempts; worker output:\n{worker_output(folder)}")
    return 1000 * (attempts[0].started_at - before), 1000 * (returned - before)


def run_latency(kinds: list[str], k: int, scratch: Path, pg: str) -> dict[str, Any]:
    """One idle worker per store; K single-job submissions to each, alternating stores."""
    from jobfleet.store import open_store

    ms: dict[str, list[float]] = {kind: [] for kind in kinds}
    submit_ms: dict[str, list[float]] = {kind: [] for kind in kinds}
    with contextlib.ExitStack() as stack:
        stores = {}
        for kind in kinds:
            folder = Path(tempfile.mkdtemp(prefix=f"latency-{kind}-", dir=scratch))
            url = stack.enter_context(fresh_store(kind, folder, pg))
            store = stack.enter_context(open_store(url))
            stack.enter_context(running_workers(1, store, url, folder / "blobs", folder))
            stores[kind] = (store, folder)
        time.sleep(IDLE_BEFORE)
        for i in range(1, k + 1):
            for kind, (store, folder) in stores.items():
                latency, submit = latency_sample(store, folder)
                ms[kind].append(latency)
                submit_ms[kind].append(submit)
                print(f"  latency {i}/{k} {kind:<9} {latency:8.2f} ms", file=sys.stderr, flush=True)
                time.sleep(random.uniform(*PAUSE))
    return {kind: {"ms": ms[kind], "median_ms": statistics.median(ms[kind]),
                   "p90_ms": p90(ms[kind]), "min_ms": min(ms[kind]), "max_ms": max(ms[kind]),
                   "submit_ms": submit_ms[kind],
                   "submit_median_ms": statistics.median(submit_ms[kind])}
            for kind in kinds}


def p90(xs: list[float]) -> float:
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]


def print_latency(result: dict[str, Any], k: int) -> None:
    print(f"\nlatency: one `{COMMAND}` job submitted to an idle worker ({SLOTS} slots), {k} "
          f"sample{'s' if k != 1 else ''} per store, stores alternating; submit call to the job's "
          "recorded start")
    print(f"  {'store':<10}{'median ms':>10}{'p90 ms':>9}{'min ms':>9}{'max ms':>9}"
          f"{'submit call ms':>16}")
    for kind, r in result.items():
        print(f"  {kind:<10}{r['median_ms']:>10.2f}{r['p90_ms']:>9.2f}{r['min_ms']:>9.2f}"
              f"{r['max_ms']:>9.2f}{r['submit_median_ms']:>16.2f}")


# -- goals ----------------------------------------------------------------------------------------


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each latency target, PASS, FAIL or SKIP (its store was not measured), with a line."""
    out = []
    skipped = report["postgres"].get("skipped")
    for kind, target, source in TARGETS:
        measured = report["latency"].get(kind)
        goal: dict[str, Any] = {"goal": f"{kind} submit-to-start latency", "target_ms": target,
                                "source": source}
        if measured is None:
            why = skipped if kind == "postgres" and skipped else "--latency-samples 0"
            goal.update(status="SKIP", line=f"SKIP {kind} median submit-to-start latency under "
                        f"{target:g} ms ({source}): not measured, {why}")
        else:
            median = measured["median_ms"]
            status = "PASS" if median < target else "FAIL"
            goal.update(status=status, median_ms=median,
                        line=f"{status} {kind} median submit-to-start latency {median:.2f} ms, "
                             f"target under {target:g} ms ({source})")
        out.append(goal)
    return out


def throughput_lines(report: dict[str, Any]) -> list[str]:
    """No target is set for throughput: what was measured, without PASS or FAIL."""
    result = report["throughput"]
    return [f"INFO throughput {name}: {c['jobs_per_second']:.0f} jobs/s"
            + (f", {result['ratios'][f'{name}/{REFERENCE}']:.2f}x {REFERENCE}'s"
               if name != REFERENCE else ", the reference") + " (no target set)"
            for name, c in result["configurations"].items()]


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=2000, metavar="N",
                   help="jobs per throughput run [2000]")
    p.add_argument("--repeat", type=int, default=3, metavar="R",
                   help="throughput runs per configuration [3]")
    p.add_argument("--workers", default="2,4", metavar="LIST",
                   help="PostgreSQL worker counts to time, comma-separated [2,4]; SQLite runs "
                        "with 1")
    p.add_argument("--latency-samples", type=int, default=30, metavar="K",
                   help="single-job submissions per store [30]; 0 skips the latency part")
    p.add_argument("--pg", default=os.environ.get("JOBFLEET_BENCH_PG", DEFAULT_PG), metavar="URL",
                   help="a PostgreSQL server where fresh databases may be created (env "
                        f"JOBFLEET_BENCH_PG) [{DEFAULT_PG}]")
    p.add_argument("--skip-postgres", action="store_true", help="measure SQLite only")
    p.add_argument("--require-postgres", action="store_true",
                   help="an unreachable PostgreSQL server is an error, not a skip")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results [benchmarks/results/fleet.json]")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="longest one throughput run may take [60 + 0.05 s per job]")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a latency target is missed (FAIL)")
    a = p.parse_args(argv)
    try:
        a.workers = sorted({int(w) for w in a.workers.split(",") if w.strip()})
    except ValueError:
        p.error(f"--workers wants whole numbers separated by commas, not {a.workers!r}")
    if any(w < 1 for w in a.workers):
        p.error("--workers: every count must be at least 1")
    for name in ("jobs", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.latency_samples < 0:
        p.error("--latency-samples must be 0 or more")
    if a.skip_postgres and a.require_postgres:
        p.error("--skip-postgres and --require-postgres contradict each other")
    if a.timeout is None:
        a.timeout = 60 + 0.05 * a.jobs
    a.check_ratio = None  # common.finish's ratio check: the targets here are latencies
    return a


def find_postgres(a: argparse.Namespace) -> dict[str, Any]:
    from jobfleet.store.urls import masked

    info: dict[str, Any] = {"server": masked(a.pg)}
    if a.skip_postgres:
        info["skipped"] = "--skip-postgres given"
    else:
        version, why = probe_postgres(a.pg)
        if why and a.require_postgres:
            raise BenchmarkError(f"--require-postgres: {why}")
        if why:
            info["skipped"] = why
        else:
            info["version"] = version
    if "skipped" in info:
        print(f"skipping postgres: {info['skipped']}")
    return info


def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    try:
        import jobfleet
    except ImportError as e:
        raise BenchmarkError(f"cannot import jobfleet with {sys.executable} ({e}); run this with "
                             "the Python jobfleet is installed in (pip install -e .)") from None
    # the workers start often: compile once, as `pip install` would (PYTHONDONTWRITEBYTECODE)
    compileall.compile_dir(Path(jobfleet.__file__).parent, quiet=1)
    postgres = find_postgres(a)
    configs = [Config("sqlite", 1)]
    if "skipped" not in postgres:
        configs += [Config("postgres", w) for w in a.workers]
    report: dict[str, Any] = {
        "benchmark": "fleet",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"jobs": a.jobs, "repeat": a.repeat, "command": COMMAND,
                     "slots_per_worker": SLOTS, "configurations": [c.name for c in configs],
                     "latency_samples": a.latency_samples, "poll_seconds": POLL,
                     "worker_argv": worker_argv()},
        "machine": machine(),
        "jobfleet": {"version": jobfleet.__version__, "python": sys.executable},
        "postgres": postgres,
    }
    with tempfile.TemporaryDirectory(prefix="jobfleet-fleet-") as tmp:
        scratch = Path(tmp)
        samples: dict[str, list[Sample]] = {c.name: [] for c in configs}
        for rep in range(1, a.repeat + 1):
            for c in configs:
                s = run_throughput(c, a.jobs, scratch, a.pg, a.timeout)
                samples[c.name].append(s)
                print(f"  throughput {rep}/{a.repeat} {c.name:<12} {s.seconds:8.3f}s "
                      f"({a.jobs / s.seconds:.0f} jobs/s)", file=sys.stderr, flush=True)
        entries = {c.name: summarise_throughput(c, samples[c.name], a.jobs) for c in configs}
        base = entries[REFERENCE]["median"]
        report["throughput"] = {
            "configurations": entries,
            "ratios": {f"{name}/{REFERENCE}": base / e["median"]
                       for name, e in entries.items() if name != REFERENCE},
        }
        print_throughput(report["throughput"], a.jobs, a.repeat)
        kinds = sorted({c.store for c in configs}, key=["sqlite", "postgres"].index)
        report["latency"] = (run_latency(kinds, a.latency_samples, scratch, a.pg)
                             if a.latency_samples else {})
        if report["latency"]:
            print_latency(report["latency"], a.latency_samples)
    report["goals"] = goals(report)
    report["machine"]["load_average_end"] = os.getloadavg()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    reports: list[dict[str, Any]] = []

    def run(a: argparse.Namespace) -> dict[str, Any]:
        reports.append(benchmark(a))
        return reports[-1]

    code = finish(a, run, lambda report, target: (True, ""))
    if code != 0:
        return code
    report = reports[0]
    print()
    for line in throughput_lines(report):
        print(line)
    for goal in report["goals"]:
        print(goal["line"])
    missed = [g for g in report["goals"] if g["status"] == "FAIL"]
    if a.check and missed:
        print(f"--check: {len(missed)} latency target(s) missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
