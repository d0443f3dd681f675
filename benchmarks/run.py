#!/usr/bin/env python3
"""Every speed goal of the project, measured against the peers in one invocation.

Workloads (benchmarks/README.md says what each measures):
  W1  2,000 shell jobs (`true`, `sleep 0.01`), 2 slots: jobfleet run, GNU parallel, xargs
  W2  20,000 calls of a trivial function, 2 workers, unchunked and chunksize=100:
      jobfleet Executor, ProcessPoolExecutor, Dask distributed, Ray, Celery (Redis)
  W3  submit-to-start latency on an idle worker, SQLite and PostgreSQL
  W4  `jobfleet submit` of a 1,000,000-job file: time and peak memory
  W5  a worker's throughput on queues of 1e3, 1e4, 1e5 and 1e6 jobs
  W6  store throughput: PostgreSQL with 2 and 4 workers beside SQLite with 1

Tools run interleaved within a workload and repeated; tables give medians and ratios to
jobfleet. The JSON goes to benchmarks/results/latest.json and, for a full run, the Markdown
table to docs/benchmarks.md. The last lines say PASS or FAIL per goal.

    python benchmarks/run.py --install [--quick] [--only W1,W2] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import calls
import fleet
import goals
import overhead
import peers
import report
import scale
from common import SUBJECT, BenchmarkError, machine

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"
DEFAULT_MARKDOWN = HERE.parent / "docs" / "benchmarks.md"
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")
COMMAND_PEERS = ("parallel", "xargs", overhead.FLOOR)
CALL_PEERS = ("processpool", "dask", "ray", "celery")
PEERS = COMMAND_PEERS + CALL_PEERS


@dataclass(frozen=True)
class Sizes:
    w1_jobs: int = 2000
    w1_repeat: int = 5
    w2_calls: int = 20000
    w2_repeat: int = 3
    w2_chunksize: int = 100
    w3_samples: int = 30
    w4_jobs: int = 1_000_000
    w4_repeat: int = 3
    w5_queues: tuple[int, ...] = (1000, 10_000, 100_000, 1_000_000)
    w5_take: int = 1000
    w5_repeat: int = 5
    w6_jobs: int = 2000
    w6_repeat: int = 3
    w6_workers: tuple[int, ...] = (2, 4)


FULL = Sizes()
QUICK = Sizes(w1_jobs=40, w1_repeat=1, w2_calls=200, w2_repeat=1, w2_chunksize=10,
              w3_samples=3, w4_jobs=2000, w4_repeat=1, w5_queues=(100, 1000), w5_take=50,
              w5_repeat=1, w6_jobs=50, w6_repeat=1)
SLOTS = 2


@dataclass
class Context:
    a: argparse.Namespace
    sizes: Sizes
    scratch: Path
    jobfleet: overhead.Tool
    command_peers: list[overhead.Tool] = field(default_factory=list)
    call_peers: list[calls.Tool] = field(default_factory=list)
    postgres: dict[str, Any] = field(default_factory=dict)

    def repeat(self, default: int) -> int:
        return self.a.repeat or default


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# -- W1: shell jobs -------------------------------------------------------------------------------


def w1(ctx: Context) -> dict[str, Any]:
    n, repeat = ctx.sizes.w1_jobs, ctx.repeat(ctx.sizes.w1_repeat)
    tools = [ctx.jobfleet, *(t for t in ctx.command_peers if t.exe)]
    out: dict[str, Any] = {"jobs": n, "slots": SLOTS, "repeat": repeat, "workloads": {}}
    for workload in ("true", "sleep"):
        cmds = ctx.scratch / f"w1-{workload}.txt"
        cmds.write_text(f"{overhead.WORKLOADS[workload]}\n" * n)
        samples: dict[str, list[overhead.Sample]] = {t.name: [] for t in tools}
        for rep in range(1, repeat + 1):
            for t in tools:
                s = (overhead.run_jobfleet(t, workload, n, SLOTS, ctx.scratch, 60 + 0.2 * n)
                     if t.name == SUBJECT else overhead.run_peer(t, cmds, SLOTS, 60 + 0.2 * n))
                samples[t.name].append(s)
                progress(f"W1 {workload} {rep}/{repeat} {t.name:<10} {s.seconds:8.3f}s")
        entries = {name: overhead.summarise(ss, n) for name, ss in samples.items()}
        base = entries[SUBJECT]["median"]
        out["workloads"][workload] = {
            "command": overhead.WORKLOADS[workload], "tools": entries,
            "ratios": {f"{name}/{SUBJECT}": e["median"] / base
                       for name, e in entries.items() if name != SUBJECT}}
    return out


# -- W2: function calls ---------------------------------------------------------------------------


def w2(ctx: Context) -> dict[str, Any]:
    n, repeat = ctx.sizes.w2_calls, ctx.repeat(ctx.sizes.w2_repeat)
    tools = [calls.find_jobfleet(), *(t for t in ctx.call_peers if t.python)]
    out: dict[str, Any] = {"calls": n, "workers": SLOTS, "repeat": repeat, "modes": {}}
    timeout = 120 + 0.005 * n
    for mode, chunksize in (("unchunked", 1), (f"chunksize={ctx.sizes.w2_chunksize}",
                                                 ctx.sizes.w2_chunksize)):
        samples: dict[str, list[calls.Sample]] = {t.name: [] for t in tools}
        for rep in range(1, repeat + 1):
            for t in tools:
                s = calls.run_once(t, n, SLOTS, ctx.scratch, timeout, chunksize)
                samples[t.name].append(s)
                progress(f"W2 {mode} {rep}/{repeat} {t.name:<12} map {s.map_seconds:8.3f}s")
        entries = {name: calls.summarise(ss, n) for name, ss in samples.items()}
        base = entries[SUBJECT]["map_median"]
        out["modes"][mode] = {
            "chunksize": chunksize, "tools": entries,
            "ratios": {f"{name}/{SUBJECT}": e["map_median"] / base
                       for name, e in entries.items() if name != SUBJECT}}
    return out


# -- W3 and W6: the stores ------------------------------------------------------------------------


def _store_kinds(ctx: Context) -> list[str]:
    return ["sqlite"] + ([] if "skipped" in ctx.postgres else ["postgres"])


def w3(ctx: Context) -> dict[str, Any]:
    k = ctx.sizes.w3_samples
    latency = fleet.run_latency(_store_kinds(ctx), k, ctx.scratch, ctx.a.pg)
    return {"samples": k, "stores": latency}


def w6(ctx: Context) -> dict[str, Any]:
    n, repeat = ctx.sizes.w6_jobs, ctx.repeat(ctx.sizes.w6_repeat)
    configs = [fleet.Config("sqlite", 1)]
    if "skipped" not in ctx.postgres:
        configs += [fleet.Config("postgres", w) for w in ctx.sizes.w6_workers]
    samples: dict[str, list[fleet.Sample]] = {c.name: [] for c in configs}
    for rep in range(1, repeat + 1):
        for c in configs:
            s = fleet.run_throughput(c, n, ctx.scratch, ctx.a.pg, 60 + 0.05 * n)
            samples[c.name].append(s)
            progress(f"W6 {rep}/{repeat} {c.name:<11} {s.seconds:8.3f}s ({n / s.seconds:.0f} jobs/s)")
    entries = {c.name: fleet.summarise_throughput(c, samples[c.name], n) for c in configs}
    base = entries[fleet.REFERENCE]["median"]
    return {"jobs": n, "repeat": repeat, "configurations": entries,
            "ratios": {f"{name}/{fleet.REFERENCE}": base / e["median"]
                       for name, e in entries.items() if name != fleet.REFERENCE}}


# -- W4 and W5: big queues ------------------------------------------------------------------------


def w4(ctx: Context) -> dict[str, Any]:
    n, repeat = ctx.sizes.w4_jobs, ctx.repeat(ctx.sizes.w4_repeat)
    job_file = ctx.scratch / "w4-jobs.csv"
    size = scale.write_job_file(job_file, n)
    assert ctx.jobfleet.exe is not None
    samples = []
    for rep in range(1, repeat + 1):
        s = scale.submit_once(ctx.jobfleet.exe, job_file, n, ctx.scratch, 120 + 0.001 * n)
        samples.append(s)
        progress(f"W4 {rep}/{repeat} submit {n} jobs {s['seconds']:8.3f}s, peak RSS "
                 f"{s['peak_rss'] / 2**20:.0f} MiB")
    job_file.unlink()
    return {"repeat": repeat, "row": scale.W4_ROW.format(1).strip(),
            **scale.summarise_submit(samples, n, size)}


def w5(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes.w5_queues
    take = min(ctx.sizes.w5_take, *sizes)  # the smallest queue holds no more
    repeat = ctx.repeat(ctx.sizes.w5_repeat)
    queues = {}
    for n in sizes:
        path, run_id, seconds = scale.build_queue(n, ctx.scratch / f"w5-queue-{n}")
        queues[n] = (path, run_id)
        progress(f"W5 built a queue of {n} jobs in {seconds:.1f}s")
    samples: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for rep in range(1, repeat + 1):
        for n in sizes:
            path, run_id = queues[n]
            s = scale.drain_once(path, run_id, n, take, ctx.scratch, 120 + 0.05 * take)
            samples[n].append(s)
            progress(f"W5 {rep}/{repeat} queue {n:>8}: {s['jobs_per_second']:7.0f} jobs/s, "
                     f"worker CPU {s['worker_cpu']:.2f}s")
    for path, _ in queues.values():
        path.unlink()
    entries = {str(n): scale.summarise_drain(samples[n], take) for n in sizes}
    base = entries[str(sizes[0])]["median"]
    return {"take": take, "slots": scale.W5_SLOTS, "repeat": repeat, "queues": entries,
            "ratios": {f"{n}/{sizes[0]}": e["median"] / base for n, e in entries.items()}}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6}


# -- setting up -----------------------------------------------------------------------------------


def find_peers(ctx: Context, stack: contextlib.ExitStack) -> dict[str, dict[str, Any]]:
    """The peers the chosen workloads need, found or installed; {name: version or skipped}."""
    a, wanted = ctx.a, set(ctx.a.peers)
    found: dict[str, dict[str, Any]] = {}

    def note(name: str, version: str | None, skipped: str | None, **more: Any) -> None:
        found[name] = {"skipped": skipped} if skipped else {"version": version, **more}
        if skipped:
            print(f"skipping {name}: {skipped}")

    if "W1" in a.only:
        for name in COMMAND_PEERS:
            if name not in wanted:
                note(name, None, "not in --peers")
                continue
            t = (peers.find_parallel(a.install) if name == "parallel" else
                 overhead.find_floor() if name == overhead.FLOOR else overhead.find_xargs())
            note(name, t.version, t.skip_reason)
            if t.exe:
                ctx.command_peers.append(t)
    if "W2" in a.only:
        redis: dict[str, Any] | None = None
        for name in CALL_PEERS:
            if name not in wanted:
                note(name, None, "not in --peers")
                continue
            if name == "processpool":
                tool = calls.find_processpool()
            else:
                tool = peers.find_python_peer(name, a.install, getattr(a, f"{name}_python"))
            if name == "celery" and tool.python:
                redis = stack.enter_context(peers.redis_server(a.redis, a.install))
                if "skipped" in redis:
                    tool.python, tool.skip_reason = None, f"no Redis: {redis['skipped']}"
                else:
                    tool.details["env"] = {"JOBFLEET_BENCH_REDIS": redis["url"]}
            extra = {"python": tool.python} if tool.python else {}
            if redis and name == "celery" and "skipped" not in redis:
                extra["redis"] = {"version": redis["version"], "private": redis["started"]}
            note(name, tool.version, tool.skip_reason, **extra)
            if tool.python:
                ctx.call_peers.append(tool)
    if {"W3", "W6"} & set(a.only):
        ctx.postgres = fleet.find_postgres(a)
    return found


def versions(ctx: Context, found: dict[str, dict[str, Any]]) -> dict[str, Any]:
    v: dict[str, Any] = {SUBJECT: ctx.jobfleet.version, "sqlite": sqlite3.sqlite_version}
    if ctx.postgres.get("version"):
        v["postgresql"] = ctx.postgres["version"]
    for name, info in found.items():
        if "version" in info:
            v[name] = info["version"]
        if "redis" in info:
            v["redis"] = info["redis"]["version"]
    return v


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one repetition: checks that everything runs (the figures "
                        "are not the goals')")
    p.add_argument("--only", default=",".join(WORKLOADS), metavar="LIST",
                   help="workloads to run, comma-separated [W1,W2,W3,W4,W5,W6]")
    p.add_argument("--peers", default=",".join(PEERS), metavar="LIST",
                   help=f"peers to compare with [{','.join(PEERS)}]")
    p.add_argument("--install", action="store_true",
                   help="install missing peers: GNU parallel (apt-get), Dask, Ray and Celery "
                        f"(pip, each into a venv under {peers.VENVS}), redis-server (apt-get)")
    p.add_argument("--repeat", type=int, metavar="R",
                   help="repetitions of every workload [W1 5, others 3; --quick 1]")
    for name in ("dask", "ray", "celery"):
        p.add_argument(f"--{name}-python", metavar="PATH",
                       help=f"the Python to run {name} with [this one, else its venv]")
    p.add_argument("--redis", default=os.environ.get("JOBFLEET_BENCH_REDIS"), metavar="URL",
                   help=f"Redis for Celery (env JOBFLEET_BENCH_REDIS) [{peers.DEFAULT_REDIS}, "
                        "else a private redis-server]")
    p.add_argument("--pg", default=os.environ.get("JOBFLEET_BENCH_PG", fleet.DEFAULT_PG),
                   metavar="URL", help="PostgreSQL server for W3 and W6 (fresh databases are "
                                       f"created there; env JOBFLEET_BENCH_PG) [{fleet.DEFAULT_PG}]")
    p.add_argument("--skip-postgres", action="store_true", help="W3 and W6 on SQLite only")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results [benchmarks/results/latest.json]")
    p.add_argument("--markdown", type=Path, metavar="PATH",
                   help="where to write the Markdown table [docs/benchmarks.md on a full run of "
                        "every workload, else none]")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="run nothing: write the Markdown (and the goal lines) of a saved result")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed (FAIL)")
    a = p.parse_args(argv)
    a.only = [w.strip().upper() for w in a.only.split(",") if w.strip()]
    if not a.only or set(a.only) - set(WORKLOADS):
        p.error(f"--only: choose from {','.join(WORKLOADS)}, not {','.join(a.only) or '(none)'}")
    a.only = [w for w in WORKLOADS if w in a.only]
    a.peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    if set(a.peers) - set(PEERS):
        p.error(f"--peers: choose from {','.join(PEERS)}")
    if a.repeat is not None and a.repeat < 1:
        p.error("--repeat must be at least 1")
    a.require_postgres = False  # fleet.find_postgres's flags
    if a.markdown is None and (a.from_json or (not a.quick and a.only == list(WORKLOADS))):
        a.markdown = DEFAULT_MARKDOWN
    return a


def benchmark(a: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    sizes = QUICK if a.quick else FULL
    started = time.time()
    out: dict[str, Any] = {
        "benchmark": "run", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["python", "benchmarks/run.py", *argv]), "quick": a.quick,
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(sizes).items()},
        "machine": machine(), "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="jobfleet-run-") as tmp, \
            contextlib.ExitStack() as stack:
        jobfleet = overhead.find_jobfleet(None)  # compiles jobfleet once, as pip install would
        ctx = Context(a, sizes, Path(tmp), jobfleet)
        found = find_peers(ctx, stack)
        out["peers"] = found
        out["versions"] = versions(ctx, found)
        out["postgres"] = ctx.postgres
        for w in a.only:
            print(f"\n{w}: {report.TITLES[w]}", flush=True)
            load = os.getloadavg()
            t0 = time.perf_counter()
            result = RUNNERS[w](ctx)
            result.update(load_average_before=load, load_average_after=os.getloadavg(),
                          wall_seconds=time.perf_counter() - t0)
            out["workloads"][w] = result
            print(report.text_table(w, result), flush=True)
    out["goals"] = goals.evaluate(out)
    out["machine"]["load_average_end"] = os.getloadavg()
    out["seconds"] = time.time() - started
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(args)
    if a.from_json:
        result = json.loads(a.from_json.read_text())
        result["goals"] = goals.evaluate(result)  # as this version of the goals reads them
    else:
        try:
            result = benchmark(a, args)
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults written to {a.json}")
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(report.markdown(result))
        print(f"Markdown written to {a.markdown}")
    print()
    for g in result["goals"]:
        print(g["line"])
    missed = [g for g in result["goals"] if g["status"] == "FAIL"]
    if a.check and missed:
        print(f"--check: {len(missed)} goal(s) missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
