#!/usr/bin/env python3
"""Python calls: jobfleet's Executor.map against Ray and ProcessPoolExecutor, in the same invocation.

Each tool makes the same N calls of a trivial function (`inc(x) = x + 1`, defined in this
script) with the same number of workers, in a fresh Python process of its own per run:

    jobfleet     list(jobfleet.Executor(workers=2, store=<tmp>, blobs=<tmp>).map(inc, xs, chunksize=1))
    ray          ray.init(num_cpus=2); ray.get([ray.remote(inc).remote(x) for x in xs])
    processpool  list(ProcessPoolExecutor(2).map(inc, xs))   (a reference, not a competitor)

The map alone is timed inside that process (after `ray.init` returned, or the executor was
constructed and `wait_for_workers()` returned: both start their workers first); the total
from the process's launch to the end of the map is reported too.
Runs are interleaved (jobfleet, ray, processpool, jobfleet, ...) and the table gives medians.
See benchmarks/README.md.

    python benchmarks/calls.py [--calls 20000] [--repeat 3] [--check-ratio X]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import SUBJECT, BenchmarkError, clean_env, finish, machine, ratio_text

SCRIPT = Path(__file__).resolve()
RESULTS = SCRIPT.parent / "results"
DEFAULT_JSON = RESULTS / "calls.json"
#: where --install-ray puts a venv with Ray (benchmarks/results/ is ignored by git)
RAY_VENV = RESULTS / ".rayenv"
#: tried in this order when --ray-python is not given (after the current interpreter)
RAY_PYTHONS = (Path("/tmp/rayenv/bin/python"), RAY_VENV / "bin" / "python")
TOOLS = (SUBJECT, "ray", "processpool", "dask", "celery")
#: the peer the project's target is stated against (on the map-only time)
TARGET_PEER = "ray"
#: the child's output shown when a run fails, characters
TAIL = 4000
#: the child waits this long for jobfleet's worker to exit by itself (it does after 3 s idle)
WORKER_EXIT_WAIT = 20.0


def inc(x: int) -> int:
    """The call every tool makes N times; in the child this is `__main__.inc`."""
    return x + 1


def inc_chunk(xs: list[int]) -> list[int]:
    """`inc` over a chunk: what a tool without a chunksize of its own runs per task."""
    return [inc(x) for x in xs]


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# -- processes ------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, None when it is gone (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
                        .replace("\0", " ").split())
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = _stat(pid)
    return st is None or st[0] not in ("Z", "X")  # no /proc: trust kill(0)


def processes(*, parent: int | None = None, session: int | None = None) -> list[int]:
    """Live processes with this parent or in this session (empty without /proc)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            st = _stat(int(entry.name))
            if st is None or st[0] in ("Z", "X"):
                continue
            if (parent is not None and st[1] == parent) or (session is not None and st[2] == session):
                found.append(int(entry.name))
    return found


def kill(pid: int) -> None:
    """SIGKILL a process and its process group (jobfleet's workers and interpreters lead one)."""
    for send in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, signal.SIGKILL)


def wait_gone(pid: int, deadline: float) -> bool:
    """Wait for a process to exit (reaping it if it is our child); False if still there at deadline."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            gone = done == pid
        except ChildProcessError:  # not our child, or reaped already
            gone = not alive(pid)
        if gone:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# -- the child: one tool, one run, in a fresh interpreter ------------------------------------------


def check_results(results: list[Any], n: int, tool: str) -> None:
    expected = [i + 1 for i in range(n)]
    if results != expected:
        bad = next((i for i, (a, b) in enumerate(zip(results, expected, strict=False)) if a != b), None)
        where = (f"first difference at {bad}: {results[bad]!r} != {expected[bad]!r}" if bad is not None
                 else f"{len(results)} results for {n} calls")
        raise SystemExit(f"{tool}: wrong results, {where}")


def child_jobfleet(n: int, workers: int, store: str, blobs: str, chunksize: int = 1
                   ) -> dict[str, Any]:
    import jobfleet
    from jobfleet.store import open_store

    imported = time.time()
    ex = jobfleet.Executor(workers=workers, store=store, blobs=blobs)
    ex.wait_for_workers()  # its worker is up before the timer, as ray.init()'s cluster is
    ready = time.time()
    t0 = time.perf_counter()
    results = list(ex.map(inc, range(n), chunksize=chunksize))
    seconds = time.perf_counter() - t0
    mapped = time.time()
    check_results(results, n, SUBJECT)
    ex.shutdown(wait=True)
    shut = time.time()
    with open_store(store) as db:
        counts = db.counts(ex.run_id or "")
        pids = [w.pid for w in db.workers() if w.host == socket.gethostname()]
    jobs = -(-n // chunksize)  # one job per chunk
    if counts.get("succeeded") != jobs:
        raise SystemExit(f"{SUBJECT}: expected {jobs} succeeded jobs in the store, found {counts}")
    # The worker (our child, in its own session) exits after 3 s without work, and stops its warm
    # interpreters (each in its own session too) first. Wait for both; kill what outlives the wait.
    deadline = time.monotonic() + WORKER_EXIT_WAIT
    stopped: list[dict[str, Any]] = []
    for pid in pids:
        interpreters = processes(parent=pid)
        exited = wait_gone(pid, deadline)
        if not exited:
            kill(pid)
            wait_gone(pid, time.monotonic() + 5)
        left = [p for p in interpreters if not wait_gone(p, time.monotonic() + 2)]
        for p in left:
            kill(p)
        stopped.append({"pid": pid, "exited_by_itself": exited, "interpreters": len(interpreters),
                        "interpreters_killed": len(left)})
    return {"version": jobfleet.__version__, "imported": imported, "ready": ready, "mapped": mapped,
            "map_seconds": seconds, "shutdown_seconds": shut - mapped,
            "worker_exit_seconds": time.time() - shut, "workers": stopped}


def child_ray(n: int, workers: int, chunksize: int = 1) -> dict[str, Any]:
    import ray

    imported = time.time()
    ray.init(num_cpus=workers)
    ready = time.time()
    t0 = time.perf_counter()
    if chunksize == 1:
        remote_inc = ray.remote(inc)
        results = ray.get([remote_inc.remote(i) for i in range(n)])
    else:  # Ray has no chunksize: one task per chunk
        remote_chunk = ray.remote(inc_chunk)
        results = [y for ys in ray.get([remote_chunk.remote(c) for c in chunks(n, chunksize)])
                   for y in ys]
    seconds = time.perf_counter() - t0
    mapped = time.time()
    check_results(results, n, "ray")
    ray.shutdown()
    return {"version": ray.__version__, "imported": imported, "ready": ready, "mapped": mapped,
            "map_seconds": seconds, "shutdown_seconds": time.time() - mapped}


def child_processpool(n: int, workers: int, chunksize: int = 1) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    imported = time.time()
    pool = ProcessPoolExecutor(workers)
    ready = time.time()
    t0 = time.perf_counter()
    results = list(pool.map(inc, range(n), chunksize=chunksize))
    seconds = time.perf_counter() - t0
    mapped = time.time()
    check_results(results, n, "processpool")
    pool.shutdown(wait=True)
    return {"version": f"Python {platform.python_version()}", "imported": imported, "ready": ready,
            "mapped": mapped, "map_seconds": seconds, "shutdown_seconds": time.time() - mapped}


def child_main(argv: Sequence[str]) -> int:
    """`calls.py _child TOOL ...`: one run, its timings written as JSON to --result."""
    started = time.time()
    p = argparse.ArgumentParser(prog="calls.py _child")
    p.add_argument("tool", choices=TOOLS)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--chunksize", type=int, default=1)
    p.add_argument("--store")
    p.add_argument("--blobs")
    a = p.parse_args(argv)
    if a.tool == SUBJECT:
        result = child_jobfleet(a.calls, a.workers, a.store, a.blobs, a.chunksize)
    elif a.tool == "ray":
        result = child_ray(a.calls, a.workers, a.chunksize)
    elif a.tool == "processpool":
        result = child_processpool(a.calls, a.workers, a.chunksize)
    else:  # the peers of run.py, in callpeers.py (their imports only exist in their venvs)
        import callpeers

        child = callpeers.child_dask if a.tool == "dask" else callpeers.child_celery
        result = child(inc, inc_chunk, a.calls, a.workers, a.chunksize)
        check_results(result.pop("results"), a.calls, a.tool)
    result.update(started=started, python=sys.executable, calls=a.calls, chunksize=a.chunksize)
    a.result.write_text(json.dumps(result))
    return 0


# -- finding the tools ----------------------------------------------------------------------------


@dataclass
class Tool:
    """A tool and the interpreter its runs start with (None: skipped, see skip_reason)."""

    name: str
    python: str | None
    skip_reason: str | None = None
    version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def env_for(tool: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = clean_env() | (extra or {})
    if tool == "ray":
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report sent home from ray.init
    return env


def find_jobfleet() -> Tool:
    try:
        import jobfleet
    except ImportError as e:
        raise BenchmarkError(f"cannot import jobfleet with {sys.executable} ({e}); run this with "
                             "the Python jobfleet is installed in (pip install -e .)") from None
    package = Path(jobfleet.__file__).parent
    # The worker and its interpreters start during the timed map; without bytecode (an editable
    # install under PYTHONDONTWRITEBYTECODE) each would compile jobfleet first. Compile once, as
    # `pip install` does.
    compileall.compile_dir(package, quiet=1)
    return Tool(SUBJECT, sys.executable, version=jobfleet.__version__, details={"module": str(package)})


def ray_version(python: str) -> tuple[str | None, str]:
    """(Ray's version, "") if `python` can import ray, else (None, why not)."""
    try:
        p = subprocess.run([python, "-c", "import ray; print(ray.__version__)"], capture_output=True,
                           text=True, timeout=180, stdin=subprocess.DEVNULL, env=env_for("ray"))
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"exit status {p.returncode}"
    return p.stdout.strip().splitlines()[-1], ""


def install_ray() -> str:
    """A venv under benchmarks/results/ with `pip install ray`; returns its python."""
    python = RAY_VENV / "bin" / "python"
    print(f"installing Ray: pip install ray into {RAY_VENV} (a few hundred MB, once)", flush=True)
    steps = [[sys.executable, "-m", "venv", str(RAY_VENV)]] if not python.exists() else []
    steps.append([str(python), "-m", "pip", "install", "--quiet", "ray"])
    for argv in steps:
        p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            out = (p.stdout + p.stderr)[-TAIL:]
            raise BenchmarkError(f"--install-ray: {' '.join(argv)} exited with status {p.returncode}:\n{out}")
    return str(python)


def find_ray(given: str | None, install: bool) -> Tool:
    if given:
        found = shutil.which(given)  # runs start in their own folder: make the path absolute
        given = os.path.abspath(found) if found else given  # (not resolved: a venv's python is a link)
        version, why = ray_version(given)
        if version is None:
            raise BenchmarkError(f"--ray-python {given} cannot import ray: {why}")
        return Tool("ray", given, version=version)
    tried = []
    for python in (sys.executable, *map(str, RAY_PYTHONS)):
        version, why = ray_version(python) if Path(python).exists() else (None, "not found")
        if version is not None:
            return Tool("ray", python, version=version)
        tried.append(f"{python} ({why})")
    if install:
        python = install_ray()
        version, why = ray_version(python)
        if version is None:
            raise BenchmarkError(f"--install-ray: {python} still cannot import ray: {why}")
        return Tool("ray", python, version=version, details={"installed": True})
    return Tool("ray", None, "no interpreter here can import ray; tried " + ", ".join(tried)
                + "; pass --ray-python PATH or --install-ray")


def find_processpool() -> Tool:
    return Tool("processpool", sys.executable, version=f"Python {platform.python_version()}")


# -- running --------------------------------------------------------------------------------------


@dataclass
class Sample:
    map_seconds: float  # timed inside the child, around the map only
    total_seconds: float  # from the child's launch to the end of its map
    startup_seconds: float  # from launch to ready (interpreter, imports, ray.init / executor)
    exit_seconds: float  # from launch to the child's exit (shutdown, waiting for workers)
    details: dict[str, Any] = field(default_factory=dict)


def _leftovers(session: int, store: Path) -> list[str]:
    """Kill what a finished child left running: its session, and the jobfleet workers of its store
    (each in a session of its own, as are their interpreters)."""
    left = processes(session=session)
    for pid in _worker_pids(store):
        if alive(pid) and str(store) in _cmdline(pid):  # not a pid reused since
            left += [pid, *processes(parent=pid)]
    described = [f"{pid} {_cmdline(pid)[:100]}" for pid in left]
    for pid in left:
        kill(pid)
    return described


def _worker_pids(store: Path) -> list[int]:
    if not store.exists():
        return []
    from jobfleet.store import open_store

    with open_store(store) as db:
        return [w.pid for w in db.workers() if w.host == socket.gethostname()]


def run_once(tool: Tool, n: int, workers: int, scratch: Path, timeout: float,
             chunksize: int = 1) -> Sample:
    """One run of a tool in a fresh process and folder (a fresh store for jobfleet); verified.

    `tool.details["env"]`, when there, is added to the run's environment."""
    assert tool.python is not None
    folder = Path(tempfile.mkdtemp(prefix=f"{tool.name}-", dir=scratch))
    store, blobs = folder / "store" / "jobfleet.db", folder / "store" / "blobs"
    result = folder / "result.json"
    argv = [tool.python, str(SCRIPT), "_child", tool.name, "--calls", str(n), "--workers", str(workers),
            "--result", str(result), "--chunksize", str(chunksize)]
    if tool.name == SUBJECT:
        argv += ["--store", str(store), "--blobs", str(blobs)]
    try:
        with tempfile.TemporaryFile() as output:  # Ray logs a lot: shown only when the run fails
            launched = time.time()
            proc = subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT,
                                    env=env_for(tool.name, tool.details.get("env")),
                                    start_new_session=True)
            failure = None
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                failure = f"did not finish in {timeout:.0f}s"
            exited = time.time()
            left = _leftovers(proc.pid, store)
            if failure is None and code != 0:
                failure = f"exited with status {code}"
            if failure is None and not result.is_file():
                failure = "wrote no result"
            if failure:
                output.seek(0)
                tail = output.read()[-TAIL:].decode("utf-8", "replace")
                killed = f"\nleft running, killed: {'; '.join(left)}" if left else ""
                raise BenchmarkError(f"{tool.name} run {' '.join(argv)} {failure}{killed}\n"
                                     f"its output:\n{tail}")
        if left:
            print(f"warning: {tool.name} left processes running, killed: {'; '.join(left)}",
                  file=sys.stderr)
        r = json.loads(result.read_text())
        if r.get("calls") != n:
            raise BenchmarkError(f"{tool.name}: the run reports {r.get('calls')} calls, not {n}")
        details = {k: v for k, v in r.items() if k not in ("imported", "ready", "mapped", "started",
                                                           "map_seconds", "calls")}
        details.update(interpreter_seconds=r["started"] - launched, import_seconds=r["imported"] - launched,
                       left_running=left)
        return Sample(r["map_seconds"], r["mapped"] - launched, r["ready"] - launched, exited - launched,
                      details)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- reporting ------------------------------------------------------------------------------------


def summarise(samples: list[Sample], n: int) -> dict[str, Any]:
    maps = [s.map_seconds for s in samples]
    totals = [s.total_seconds for s in samples]
    median = statistics.median(maps)
    return {"map_seconds": maps, "map_median": median, "map_min": min(maps),
            "calls_per_second": n / median, "per_call_us": 1e6 * median / n,
            "total_seconds": totals, "total_median": statistics.median(totals),
            "startup_median": statistics.median(s.startup_seconds for s in samples),
            "exit_seconds": [s.exit_seconds for s in samples],
            "runs": [s.details for s in samples]}



def print_table(report: dict[str, Any]) -> None:
    s, tools = report["settings"], report["results"]
    print(f"\n{s['calls']} calls of inc(x) = x + 1, {s['workers']} workers, "
          f"{s['repeat']} interleaved run{'s' if s['repeat'] != 1 else ''} per tool")
    print(f"  {'tool':<13}{'map s':>9}{'calls/s':>10}{'total s':>10}  vs jobfleet (map)")
    base = tools[SUBJECT]["map_median"]
    for name, t in tools.items():
        vs = "" if name == SUBJECT else ratio_text(name, t["map_median"] / base)
        print(f"  {name:<13}{t['map_median']:>9.3f}{t['calls_per_second']:>10.0f}"
              f"{t['total_median']:>10.3f}  {vs}".rstrip())
    print("  medians; map: the map alone, timed inside the tool's process; total: from that "
          "process's launch\n  to the end of the map (interpreter, imports, ray.init or executor, map)")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=20000, metavar="N", help="calls per run [20000]")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="runs per tool [3]")
    p.add_argument("--workers", type=int, default=2, metavar="W",
                   help="worker processes, for every tool [2]")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results [benchmarks/results/calls.json]")
    p.add_argument("--ray-python", metavar="PATH",
                   help="the Python to run Ray with [this one, else /tmp/rayenv/bin/python, else "
                        "benchmarks/results/.rayenv/bin/python]")
    p.add_argument("--install-ray", action="store_true",
                   help=f"when no Python can import ray, pip install it into a venv at {RAY_VENV}")
    p.add_argument("--check-ratio", type=float, metavar="X",
                   help=f"exit 1 unless {TARGET_PEER}/{SUBJECT} on the map time is >= X "
                        f"(exit 2 if {TARGET_PEER} was skipped)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="longest one run may take [120 + 5 ms per call]")
    a = p.parse_args(argv)
    for name in ("calls", "repeat", "workers"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.ray_python and a.install_ray:
        p.error("--ray-python and --install-ray exclude each other")
    if a.timeout is None:
        a.timeout = 120 + 0.005 * a.calls
    return a


def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    tools = [find_jobfleet(), find_ray(a.ray_python, a.install_ray), find_processpool()]
    for t in tools:
        if t.skip_reason:
            print(f"skipping {t.name}: {t.skip_reason}")
            if a.check_ratio is not None and t.name == TARGET_PEER:  # say so now, not after the runs
                raise BenchmarkError(f"--check-ratio: no {TARGET_PEER}/{SUBJECT} ratio without "
                                     f"{TARGET_PEER}, which is skipped (see above)")
    active = [t for t in tools if t.python]
    report: dict[str, Any] = {
        "benchmark": "calls",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"calls": a.calls, "repeat": a.repeat, "workers": a.workers,
                     "function": "inc(x) = x + 1"},
        "machine": machine(),
        "tools": {t.name: {"python": t.python, "version": t.version, **t.details,
                           **({"skipped": t.skip_reason} if t.skip_reason else {})} for t in tools},
        "results": {},
    }
    samples: dict[str, list[Sample]] = {t.name: [] for t in active}
    with tempfile.TemporaryDirectory(prefix="jobfleet-calls-") as tmp:
        for rep in range(1, a.repeat + 1):
            for t in active:
                s = run_once(t, a.calls, a.workers, Path(tmp), a.timeout)
                samples[t.name].append(s)
                print(f"  {rep}/{a.repeat} {t.name:<12} map {s.map_seconds:8.3f}s  total "
                      f"{s.total_seconds:8.3f}s", file=sys.stderr, flush=True)
    report["results"] = {name: summarise(ss, a.calls) for name, ss in samples.items()}
    base = report["results"][SUBJECT]
    report["ratios"] = {f"{name}/{SUBJECT}": {"map": r["map_median"] / base["map_median"],
                                              "total": r["total_median"] / base["total_median"]}
                        for name, r in report["results"].items() if name != SUBJECT}
    report["machine"]["load_average_end"] = os.getloadavg()
    print_table(report)
    return report


def check_ratio(report: dict[str, Any], target: float) -> tuple[bool, str]:
    ratio = report["ratios"][f"{TARGET_PEER}/{SUBJECT}"]["map"]
    text = f"--check-ratio: {ratio_text(TARGET_PEER, ratio)} on the map time"
    if ratio < target:
        medians = {name: report["results"][name]["map_median"] for name in (SUBJECT, TARGET_PEER)}
        return False, (f"{text} is below the target {target:g}x (map medians: "
                       + ", ".join(f"{name} {m:.3f}s" for name, m in medians.items()) + ")")
    return True, f"{text} meets the target {target:g}x"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["_child"]:
        return child_main(args[1:])
    a = parse_args(args)
    return finish(a, benchmark, check_ratio)


if __name__ == "__main__":
    sys.exit(main())
