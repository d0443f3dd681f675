#!/usr/bin/env python3
"""Gateway throughput and latency: workers through `jobfleet server` beside workers of the
PostgreSQL store itself, in one invocation.

Throughput: N `true` jobs are submitted at once to a fresh PostgreSQL database and run by W
`jobfleet worker` processes (2 slots each), either connected to the database (`direct-W`, the
reference) or holding only a worker token for a `jobfleet server` in front of that database
(`gateway-W`; the server is its own process, on 127.0.0.1, plain HTTP). The time from the
submit call to the moment the store counts every job finished is measured for each
configuration, interleaved and repeated; the table reports medians and the ratio of each
gateway configuration's jobs/s to the direct one with as many workers.

Latency: one `true` job at a time is submitted to an idle worker of each kind; the latency
is the attempt's recorded start minus the time just before the submit call (as in fleet.py).

    python benchmarks/gateway.py [--jobs 2000] [--repeat 3] [--workers 2,4] [--latency-samples 20]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import BenchmarkError, clean_env, finish, machine
from fleet import (
    COMMAND,
    DEFAULT_PG,
    IDLE_BEFORE,
    PAUSE,
    POLL,
    SLOTS,
    WORKER_IDLE_EXIT,
    Sample,
    fresh_postgres,
    latency_sample,
    p90,
    probe_postgres,
    stop_workers,
    summarise_throughput,
    verify,
    wait_finished,
    wait_registered,
)

if TYPE_CHECKING:  # jobfleet is imported where used: a missing install is a clear error
    from jobfleet.store import Store

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "gateway.json"
SERVER_START_WITHIN = 60.0


@dataclass(frozen=True)
class Config:
    mode: str  # direct or gateway
    workers: int

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.workers}"

    store = "postgres"  # behind the server too

    @property
    def reference(self) -> str:
        return f"direct-{self.workers}"


# -- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(url: str, blobs: Path, folder: Path) -> Iterator[str]:
    """`jobfleet server` for the store at `url` (given in its environment); its address."""
    port = free_port()
    env = clean_env() | {"JOBFLEET_STORE": url, "JOBFLEET_BLOBS": str(blobs)}
    with open(folder / "server.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobfleet", "server", "--port", str(port),
                                 "--no-dashboard"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_WITHIN
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"the server did not start: "
                                     f"{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(POLL)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_token(url: str) -> str:
    """A new worker token in the store at `url`."""
    from jobfleet.gateway.db import gateway_db
    from jobfleet.gateway.tokens import TokenInfo, digest, new_id, new_secret
    from jobfleet.store import open_store

    with open_store(url) as store:
        db = gateway_db(store)
        secret = new_secret("worker")
        db.add_token(TokenInfo(new_id(), "worker", None, "benchmark", time.time(), None),
                     digest(secret))
        db.close()
    return secret


@contextlib.contextmanager
def running_workers(cfg: Config, store: Store, url: str, folder: Path
                    ) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`cfg.workers` worker processes, of the store itself or of a server in front of it,
    registered; stopped on the way out."""
    blobs = folder / "blobs"
    with contextlib.ExitStack() as stack:
        if cfg.mode == "direct":
            env = clean_env() | {"JOBFLEET_STORE": url, "JOBFLEET_BLOBS": str(blobs)}
        else:
            server = stack.enter_context(running_server(url, blobs, folder))
            env = clean_env() | {"JOBFLEET_SERVER": server, "JOBFLEET_TOKEN": worker_token(url)}
        argv = [sys.executable, "-m", "jobfleet", "worker", "--slots", str(SLOTS),
                "--idle-exit", str(WORKER_IDLE_EXIT)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(cfg.workers):
                with open(folder / f"worker-{i + 1}.log", "wb") as out:
                    procs.append(subprocess.Popen(argv, cwd=folder, env=env,
                                                  stdin=subprocess.DEVNULL, stdout=out,
                                                  stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            wait_registered(store, procs, folder)
            yield procs
        finally:
            killed = stop_workers(procs)
            if killed:
                print(f"warning: {len(killed)} worker(s) had to be killed", file=sys.stderr)


# -- throughput -----------------------------------------------------------------------------------


def run_throughput(cfg: Config, n: int, scratch: Path, pg: str, timeout: float) -> Sample:
    from jobfleet.spec import JobSpec
    from jobfleet.store import NewRun, open_store

    folder = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=scratch))
    jobs = [JobSpec(COMMAND)] * n
    try:
        with fresh_postgres(pg) as url, open_store(url) as store:
            with running_workers(cfg, store, url, folder) as procs:
                t0 = time.time()
                run_id = store.submit(NewRun(name=f"bench-{cfg.name}", workdir=str(folder)), jobs)
                submitted = time.time()
                seconds = wait_finished(store, run_id, n, procs, t0 + timeout, cfg.name,
                                        folder) - t0
            phases = verify(store, run_id, n, cfg.name, t0)
            phases["submit"] = submitted - t0
            shares = sorted((w.jobs_done for w in store.workers()), reverse=True)
        return Sample(seconds, phases, shares)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_throughput(result: dict[str, Any], n: int, repeat: int) -> None:
    print(f"\nthroughput: {n} `{COMMAND}` jobs submitted at once to PostgreSQL, {SLOTS} slots per"
          f" worker, {repeat} interleaved run{'s' if repeat != 1 else ''} per configuration")
    print(f"  {'configuration':<14}{'workers':>8}{'median s':>10}{'min s':>9}{'jobs/s':>9}"
          f"  {'vs direct':<10}{'1st start':>10}{'last end':>9}")
    for name, c in result["configurations"].items():
        ratio = result["ratios"].get(name)
        ph = c["phase_medians"]
        print(f"  {name:<14}{c['workers']:>8}{c['median']:>10.3f}{c['min']:>9.3f}"
              f"{c['jobs_per_second']:>9.0f}  {f'{ratio:.2f}x' if ratio else '':<10}"
              f"{ph['first_started']:>10.3f}{ph['last_finished']:>9.3f}")
    print("  (vs direct: jobs/s over those of as many workers connected to the store itself)")


# -- latency --------------------------------------------------------------------------------------


def run_latency(k: int, scratch: Path, pg: str) -> dict[str, Any]:
    """One idle worker of each kind, each on its own database; K single-job submissions to
    each, alternating."""
    from jobfleet.store import open_store

    ms: dict[str, list[float]] = {"direct": [], "gateway": []}
    with contextlib.ExitStack() as stack:
        stores = {}
        for mode in ms:
            folder = Path(tempfile.mkdtemp(prefix=f"latency-{mode}-", dir=scratch))
            url = stack.enter_context(fresh_postgres(pg))
            store = stack.enter_context(open_store(url))
            stack.enter_context(running_workers(Config(mode, 1), store, url, folder))
            stores[mode] = (store, folder)
        time.sleep(IDLE_BEFORE)
        for i in range(1, k + 1):
            for mode, (store, folder) in stores.items():
                latency, _ = latency_sample(store, folder)
                ms[mode].append(latency)
                print(f"  latency {i}/{k} {mode:<8} {latency:8.2f} ms", file=sys.stderr,
                      flush=True)
                time.sleep(random.uniform(*PAUSE))
    return {mode: {"ms": xs, "median_ms": statistics.median(xs), "p90_ms": p90(xs),
                   "min_ms": min(xs), "max_ms": max(xs)} for mode, xs in ms.items()}


def print_latency(result: dict[str, Any], k: int) -> None:
    print(f"\nlatency: one `{COMMAND}` job submitted to an idle worker, {k} sample"
          f"{'s' if k != 1 else ''} each; submit call to the job's recorded start")
    print(f"  {'worker':<10}{'median ms':>10}{'p90 ms':>9}{'min ms':>9}{'max ms':>9}")
    for mode, r in result.items():
        print(f"  {mode:<10}{r['median_ms']:>10.2f}{r['p90_ms']:>9.2f}{r['min_ms']:>9.2f}"
              f"{r['max_ms']:>9.2f}")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=2000, metavar="N",
                   help="jobs per throughput run [2000]")
    p.add_argument("--repeat", type=int, default=3, metavar="R",
                   help="throughput runs per configuration [3]")
    p.add_argument("--workers", default="2,4", metavar="LIST",
                   help="worker counts to time, comma-separated [2,4]")
    p.add_argument("--latency-samples", type=int, default=20, metavar="K",
                   help="single-job submissions per kind of worker [20]; 0 skips them")
    p.add_argument("--pg", default=os.environ.get("JOBFLEET_BENCH_PG", DEFAULT_PG), metavar="URL",
                   help="a PostgreSQL server where fresh databases may be created (env "
                        f"JOBFLEET_BENCH_PG) [{DEFAULT_PG}]")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results [benchmarks/results/gateway.json]")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="longest one throughput run may take [60 + 0.05 s per job]")
    a = p.parse_args(argv)
    try:
        a.workers = sorted({int(w) for w in a.workers.split(",") if w.strip()})
    except ValueError:
        p.error(f"--workers wants whole numbers separated by commas, not {a.workers!r}")
    if not a.workers or any(w < 1 for w in a.workers):
        p.error("--workers: every count must be at least 1")
    for name in ("jobs", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.latency_samples < 0:
        p.error("--latency-samples must be 0 or more")
    if a.timeout is None:
        a.timeout = 60 + 0.05 * a.jobs
    a.check_ratio = None
    return a


def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    try:
        import jobfleet
        import jobfleet.gateway.server  # noqa: F401  (the server's packages are installed)
    except ImportError as e:
        raise BenchmarkError(f"cannot import jobfleet and its server with {sys.executable} ({e});"
                             " pip install -e '.[dev]'") from None
    compileall.compile_dir(Path(jobfleet.__file__).parent, quiet=1)
    from jobfleet.store.urls import masked

    version, why = probe_postgres(a.pg)
    if why:
        raise BenchmarkError(f"the gateway is measured in front of PostgreSQL: {why}")
    configs = [Config(mode, w) for w in a.workers for mode in ("direct", "gateway")]
    report: dict[str, Any] = {
        "benchmark": "gateway",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"jobs": a.jobs, "repeat": a.repeat, "command": COMMAND,
                     "slots_per_worker": SLOTS, "configurations": [c.name for c in configs],
                     "latency_samples": a.latency_samples, "server": "127.0.0.1, plain HTTP"},
        "machine": machine(),
        "jobfleet": {"version": jobfleet.__version__, "python": sys.executable},
        "postgres": {"server": masked(a.pg), "version": version},
    }
    with tempfile.TemporaryDirectory(prefix="jobfleet-gateway-") as tmp:
        scratch = Path(tmp)
        samples: dict[str, list[Sample]] = {c.name: [] for c in configs}
        for rep in range(1, a.repeat + 1):
            for c in configs:
                s = run_throughput(c, a.jobs, scratch, a.pg, a.timeout)
                samples[c.name].append(s)
                print(f"  throughput {rep}/{a.repeat} {c.name:<12} {s.seconds:8.3f}s "
                      f"({a.jobs / s.seconds:.0f} jobs/s)", file=sys.stderr, flush=True)
        entries = {c.name: summarise_throughput(c, samples[c.name], a.jobs)  # type: ignore[arg-type]
                   for c in configs}
        for c in configs:
            entries[c.name]["mode"] = c.mode
        report["throughput"] = {
            "configurations": entries,
            "ratios": {c.name: entries[c.name]["jobs_per_second"]
                       / entries[c.reference]["jobs_per_second"]
                       for c in configs if c.mode == "gateway"},
        }
        print_throughput(report["throughput"], a.jobs, a.repeat)
        report["latency"] = run_latency(a.latency_samples, scratch, a.pg) \
            if a.latency_samples else {}
        if report["latency"]:
            print_latency(report["latency"], a.latency_samples)
    report["machine"]["load_average_end"] = os.getloadavg()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    reports: list[dict[str, Any]] = []

    def run(a: argparse.Namespace) -> dict[str, Any]:
        reports.append(benchmark(a))
        return reports[-1]

    code = finish(a, run, lambda report, target: (True, ""))
    if code == 0:
        for name, ratio in reports[0]["throughput"]["ratios"].items():
            print(f"INFO {name}: {ratio:.2f}x the jobs/s of as many workers on the store itself")
    return code


if __name__ == "__main__":
    sys.exit(main())
