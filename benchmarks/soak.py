"""Chaos soak: jobs that leave a side effect, run while their workers, the `jobfleet run`
controller and (on PostgreSQL) the database server are killed and restarted; then every job,
attempt, log and process is checked.

    python benchmarks/soak.py --jobs 20000 --store sqlite
    python benchmarks/soak.py --jobs 20000 --store postgres     # a throwaway cluster of its own

Each job prints `start N`, sleeps a random short while (or not at all), appends `N ATTEMPT` to a
side-effect file, and prints `done N`. While they run, the soak SIGKILLs workers at three kinds
of moment (at random; right after one of its jobs was leased; right after one of its jobs wrote
its side effect, so while its completion is being recorded), SIGKILLs the `jobfleet run`
controller (once early, possibly while it is still storing the run) and reattaches to its run
with `jobfleet worker --run RUN` (or runs the file again if the run never got stored), and on
PostgreSQL restarts the server. Then it checks:

- every job is in a final state, and succeeded (losses: jobs that did not);
- one succeeded attempt per job, the last one (duplicates: jobs recorded succeeded twice, or an
  attempt whose side effect happened twice);
- each job's attempt count matches its attempt records, every attempt but the last was lost,
  and lost ones belong to killed workers;
- the side effect of every succeeded attempt happened; extra lines are re-executions of lost
  attempts (at-least-once), counted;
- the log of every recorded attempt holds its output;
- no job process is left (a marker in every job's command line), no worker either;
- SQLite: `PRAGMA integrity_check` says ok.

tests/test_chaos.py runs the same engine on a few hundred jobs. The figures of a long soak are
in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: kinds of moment a worker is killed at
MOMENTS = ("random", "after-lease", "completion")
#: how long after a database restart a process that could not connect is one that was
#: starting as the server went down, seconds; and what it then says
_STARTING_WITHIN = 5.0
_REFUSED = "check that the PostgreSQL server is running"


@dataclass
class Plan:
    """What one soak does."""

    jobs: int
    worker_kills: int
    controller_kills: int  # after the first one, which comes while the run is being stored
    restarts: int = 0  # of the database server (needs `restart`)
    workers: int = 2  # besides the controller
    slots: int = 2
    lease_seconds: float = 2.0
    max_attempts: int = 20
    seed: int = 0
    deadline: float = 600.0  # seconds for the jobs to end, at most


@dataclass
class Report:
    store: str
    jobs: int
    seed: int
    seconds: float = 0.0
    worker_kills: dict[str, int] = field(default_factory=dict)  # by moment
    controller_kills: int = 0
    reruns: int = 0  # `jobfleet run` again: the killed controller had not stored the run
    reattaches: int = 0
    restarts: int = 0
    states: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    lost_attempts: int = 0
    lost_not_killed: int = 0  # lost attempts of workers that were never killed
    reexecutions: int = 0  # side effects beyond one per job (lost attempts that still ran)
    losses: int = 0
    duplicates: int = 0
    missing_logs: int = 0
    lost_output: int = 0  # lost attempts that ran (their side effect is there) but left no log
    leftover_processes: int = 0
    unexpected_exits: int = 0  # workers that ended by themselves before the end
    #: processes that were starting when the database restarted: they could not connect,
    #: said so and exited (a store is retried once connected, not while first opening)
    refused_at_start: int = 0
    integrity: str | None = None  # SQLite's integrity_check
    problems: list[str] = field(default_factory=list)  # the first few, spelled out

    @property
    def kills(self) -> int:
        return sum(self.worker_kills.values()) + self.controller_kills

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


def pids_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def write_jobs(path: Path, n: int, effects: Path, mark: str, rng: random.Random,
               max_attempts: int) -> None:
    """`n` jobs: about 40% print and append at once, the rest sleep up to 0.1 s in between.

    `mark` is in every job process's command line: the shell's (in the effects path) and
    sleep's (the last digits of its duration).
    """
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["command", "n", "effects", "max_attempts", "retry_delay"])
        for i in range(1, n + 1):
            pause = f"sleep 0.{rng.randrange(100):02d}{mark}; " if rng.random() < 0.6 else ""
            w.writerow([f'echo start {{n}}; {pause}echo {{n}} "$JOBFLEET_ATTEMPT" >> {{effects}};'
                        f" echo done {{n}}", i, str(effects), max_attempts, 0])


class Soak:
    """One soak in `folder` against the store at `store` (a SQLite path or PostgreSQL URL)."""

    def __init__(self, folder: Path, store: str, plan: Plan,
                 restart: Callable[[], None] | None = None,
                 say: Callable[[str], None] = lambda _: None) -> None:
        self.folder, self.store, self.plan, self.restart, self.say = folder, store, plan, restart, say
        self.rng = random.Random(plan.seed)
        self._restarted_at = float("-inf")  # monotonic time of the last database restart
        self.mark = f"{self.rng.randrange(10**6):06d}"
        self.effects = folder / f"effects-{self.mark}.log"
        self.blobs = folder / "blobs"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLEET_")}
        self.env.update(JOBFLEET_STORE=store, JOBFLEET_BLOBS=str(self.blobs), PYTHONUNBUFFERED="1")
        self.workers: dict[str, subprocess.Popen[bytes]] = {}  # by worker id
        self.outputs: dict[int, Path] = {}  # what each process printed, by pid
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_id: str | None = None
        self.killed: set[str] = set()  # worker ids
        self.run_id: str | None = None
        self._started = 0
        self.report = Report("postgres" if "://" in store else "sqlite", plan.jobs, plan.seed)
        self._effects_read = 0

    # -- processes --------------------------------------------------------------------------
    def _popen(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self._started += 1
        path = self.folder / "procs" / f"{self._started:04d}-{name}.out"
        with open(path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "jobfleet", *args], cwd=self.folder,
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.outputs[proc.pid] = path
        return proc

    def _worker_args(self) -> list[str]:
        p = self.plan
        return ["--slots", str(p.slots), "--lease-seconds", str(p.lease_seconds),
                "--idle-exit", "60"]

    def start_worker(self) -> None:
        wid = f"soak{self.mark}-w{self._started + 1}"
        self.workers[wid] = self._popen(wid, "worker", "--id", wid, *self._worker_args())

    def start_controller(self) -> None:
        """`jobfleet run` the file, or, once its run is stored, reattach a worker to the run."""
        p = self.plan
        if self.run_id is None:
            self.controller = self._popen("run", "run", "jobs.csv", "--slots", str(p.slots),
                                          "--lease-seconds", str(p.lease_seconds))
            self.controller_id = None  # w<run[:4]>-1, known once the run is
            return
        wid = f"soak{self.mark}-c{self._started + 1}"
        self.controller = self._popen(wid, "worker", "--run", self.run_id, "--id", wid,
                                      *self._worker_args())
        self.controller_id = wid
        self.report.reattaches += 1

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    # -- the run ----------------------------------------------------------------------------
    def go(self) -> Report:
        from jobfleet.store import open_store

        p, r = self.plan, self.report
        (self.folder / "procs").mkdir(parents=True, exist_ok=True)
        write_jobs(self.folder / "jobs.csv", p.jobs, self.effects, self.mark, self.rng,
                   p.max_attempts)
        began = time.monotonic()
        with open_store(self.store) as db:
            try:
                self._first_controller(db)
                for _ in range(p.workers):
                    self.start_worker()
                self._drive(db)
            finally:
                self._stop_all()
            r.seconds = round(time.monotonic() - began, 1)
            self._check(db)
        self._check_processes()
        if r.store == "sqlite":
            with contextlib.closing(sqlite3.connect(self.store)) as c:
                r.integrity = "; ".join(row[0] for row in c.execute("PRAGMA integrity_check"))
            if r.integrity != "ok":
                r.problem(f"integrity_check: {r.integrity}")
        return r

    def _first_controller(self, db: Any) -> None:
        """Start `jobfleet run`, kill it early (maybe while it stores the run), and start it
        again: as `jobfleet run` if the run is not there, else as a worker on the run."""
        self.start_controller()
        assert self.controller is not None
        time.sleep(self.rng.uniform(0.2, 1.5))
        self._kill(self.controller)
        self.report.controller_kills += 1
        runs = db.runs(limit=2)
        if runs:
            self.run_id = runs[0].id
            self.killed.add(f"w{self.run_id[:4]}-1")
        else:
            self.report.reruns += 1
        self.say(f"controller killed {'after' if runs else 'before'} the run was stored")
        self.start_controller()
        deadline = time.monotonic() + 120
        while self.run_id is None:
            runs = db.runs(limit=2)
            if runs:
                self.run_id = runs[0].id
                self.controller_id = f"w{self.run_id[:4]}-1"
            elif time.monotonic() > deadline:
                raise RuntimeError("`jobfleet run` did not store its run within 120 s")
            time.sleep(0.02)
        if len(runs) != 1:
            raise RuntimeError(f"expected one run in the store, found {[x.id for x in runs]}")

    def _schedule(self) -> list[tuple[int, str]]:
        """(jobs done, action) pairs, spread between 5% and 90% of the jobs."""
        p = self.plan
        actions = (["worker"] * p.worker_kills + ["controller"] * p.controller_kills
                   + ["restart"] * (p.restarts if self.restart else 0))
        self.rng.shuffle(actions)
        n = len(actions)
        return [(int(p.jobs * (0.05 + 0.85 * (i + self.rng.random()) / max(n, 1))), a)
                for i, a in enumerate(actions)]

    def _drive(self, db: Any) -> None:
        p, r = self.plan, self.report
        assert self.run_id is not None
        todo = self._schedule()
        deadline = time.monotonic() + p.deadline
        while True:
            c = db.counts(self.run_id)
            left = c["queued"] + c["running"]
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still pending after {p.deadline:g}s: {c}")
            done = p.jobs - left
            while todo and todo[0][0] <= done:
                _, action = todo.pop(0)
                if action == "worker":
                    self._kill_worker(db)
                elif action == "controller":
                    self._kill_controller()
                else:
                    assert self.restart is not None
                    self.say(f"restarting the database at {done}/{p.jobs}")
                    self.restart()
                    self._restarted_at = time.monotonic()
                    r.restarts += 1
            self._replace_exited()
            time.sleep(0.02)

    def _replace_exited(self) -> None:
        """A worker that ended by itself (it should not before the end) is counted, replaced;
        after five such, the soak stops: something is broken, not chaotic."""
        for wid, proc in list(self.workers.items()):
            if proc.poll() is not None:
                self._exited(f"worker {wid}", proc)
                del self.workers[wid]
                self.start_worker()
        ctl = self.controller
        if ctl is not None and ctl.poll() is not None:
            # `jobfleet run` ends by itself once the run has nothing left: not before
            self._exited("the controller", ctl)
            self.start_controller()

    def _exited(self, who: str, proc: subprocess.Popen[bytes]) -> None:
        r = self.report
        said = self.outputs[proc.pid].read_text(errors="replace").strip().splitlines()[-1:]
        if (time.monotonic() - self._restarted_at < _STARTING_WITHIN
                and any(_REFUSED in line for line in said)):
            r.refused_at_start += 1  # it started as the database went down: started again
            return
        r.unexpected_exits += 1
        r.problem(f"{who} (pid {proc.pid}) exited with status {proc.returncode}: {said}")
        if r.unexpected_exits >= 5:
            raise RuntimeError("workers keep exiting by themselves:\n" + "\n".join(r.problems))

    def _running_of(self, db: Any, wid: str) -> set[int]:
        assert self.run_id is not None
        return {j.key for j in db.jobs(self.run_id, "running") if j.worker_id == wid}

    def _new_effects(self) -> list[int]:
        """Seqs of the side-effect lines written since the last look."""
        try:
            with open(self.effects, "rb") as f:
                f.seek(self._effects_read)
                data = f.read()
        except FileNotFoundError:
            return []
        data = data[:data.rfind(b"\n") + 1]
        self._effects_read += len(data)
        return [int(line.split()[0]) for line in data.splitlines() if line.strip()]

    def _kill_worker(self, db: Any) -> None:
        """SIGKILL one worker at a moment of the planned kind, and start another."""
        moment = self.rng.choice(MOMENTS)
        wid = self.rng.choice(sorted(self.workers))
        proc = self.workers[wid]
        until = time.monotonic() + 3.0
        if moment == "after-lease":  # as soon as it holds a job it did not hold before
            before = self._running_of(db, wid)
            while time.monotonic() < until and not (self._running_of(db, wid) - before):
                time.sleep(0.001)
        elif moment == "completion":  # as soon as one of its jobs has written its side effect
            assert self.run_id is not None
            self._new_effects()
            found = False
            while time.monotonic() < until and not found:
                for seq in self._new_effects():
                    holder = db.job(f"{self.run_id}-{seq}").worker_id
                    if holder in self.workers:
                        wid, proc, found = holder, self.workers[holder], True
                        break
                else:
                    time.sleep(0.001)
        self._kill(proc)
        del self.workers[wid]
        self.killed.add(wid)
        self.report.worker_kills[moment] = self.report.worker_kills.get(moment, 0) + 1
        self.start_worker()

    def _kill_controller(self) -> None:
        if self.controller is None:
            return
        self._kill(self.controller)
        if self.controller_id:
            self.killed.add(self.controller_id)
        self.report.controller_kills += 1
        self.start_controller()

    def _stop_all(self) -> None:
        """TERM every worker (the controller ends by itself); KILL what is left after 30 s."""
        procs = list(self.workers.values()) + ([self.controller] if self.controller else [])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self.report.problem(f"process {proc.pid} still running 30 s after SIGTERM")
                self._kill(proc)

    # -- the checks -------------------------------------------------------------------------
    def _check(self, db: Any) -> None:
        r, p = self.report, self.plan
        assert self.run_id is not None
        runs = db.runs(limit=5)
        if [x.id for x in runs] != [self.run_id] or runs[0].total != p.jobs:
            r.problem(f"the store holds runs {[(x.id, x.total) for x in runs]}, expected one"
                      f" run of {p.jobs} jobs")
        effects: dict[int, Counter[int]] = {}
        with open(self.effects) as f:
            for line in f:
                seq, attempt = map(int, line.split())
                effects.setdefault(seq, Counter())[attempt] += 1
        jobs = db.jobs(self.run_id)
        if len(jobs) != p.jobs:
            r.problem(f"{len(jobs)} jobs stored, expected {p.jobs}")
        r.states = dict(Counter(j.state for j in jobs))
        r.reexecutions = sum(sum(c.values()) for c in effects.values()) - len(effects)
        for job in jobs:
            self._check_job(db, job, effects.get(job.seq, Counter()))

    def _check_job(self, db: Any, job: Any, effects: Counter[int]) -> None:
        r = self.report
        attempts = db.attempts(job.key)
        r.attempts += len(attempts)
        states = [a.state for a in attempts]
        if job.state != "succeeded":
            r.losses += 1
            r.problem(f"job {job.id} ended {job.state} ({job.reason}); attempts {states}")
        wins = states.count("succeeded")
        twice = [a for a, n in effects.items() if n > 1]
        if wins > 1 or twice:
            r.duplicates += 1
            r.problem(f"job {job.id}: {wins} succeeded attempts; side effects {dict(effects)}")
        if job.attempts != len(attempts) or job.attempts < 1:
            r.problem(f"job {job.id} counts {job.attempts} attempts, {len(attempts)} recorded")
        for a in attempts[:-1]:
            if a.state != "lost":
                r.problem(f"job {job.id} attempt {a.number} ended {a.state} ({a.reason})")
        for a in attempts:
            if a.state == "lost":
                r.lost_attempts += 1
                log = self.blobs / "logs" / job.run_id / f"{job.seq}-{a.number}.log"
                if effects[a.number] and not log.exists():
                    # its output was still in the pipe when its worker was killed: it is lost
                    r.lost_output += 1
                if a.worker_id not in self.killed:
                    r.lost_not_killed += 1
                    r.problem(f"job {job.id} attempt {a.number} lost by {a.worker_id},"
                              f" which was not killed ({a.reason})")
        if max(effects, default=0) > len(attempts):
            r.problem(f"job {job.id}: side effects {dict(effects)} of attempts never recorded")
        if job.state == "succeeded":
            last = attempts[-1]
            if last.state != "succeeded":
                r.problem(f"job {job.id} succeeded but its last attempt is {last.state}")
            if effects[last.number] != 1:
                r.losses += 1
                r.problem(f"job {job.id} attempt {last.number} succeeded without its side effect")
            log = self.blobs / "logs" / job.run_id / f"{job.seq}-{last.number}.log"
            want = f"start {job.seq}\ndone {job.seq}\n"
            text = log.read_text() if log.exists() else None
            if text != want or last.log is None:
                r.missing_logs += 1
                r.problem(f"job {job.id} attempt {last.number}: log {text!r}, recorded {last.log}")

    def _check_processes(self) -> None:
        """Jobs orphaned by killed workers end by themselves within a second or so."""
        deadline = time.monotonic() + 15
        left = pids_with(self.mark)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = pids_with(self.mark)
        self.report.leftover_processes = len(left)
        for pid in left:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                self.report.problem(f"process {pid} left: {cmd.decode(errors='replace')}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in [*self.workers.values(), *([self.controller] if self.controller else [])]:
            if proc.poll() is None:
                self.report.problem(f"worker process {proc.pid} still running")
                self._kill(proc)


def soak(folder: Path, store: str, plan: Plan, restart: Callable[[], None] | None = None,
         say: Callable[[str], None] = lambda _: None) -> Report:
    """Run one soak; the report says what happened and what went wrong."""
    return Soak(folder, store, plan, restart, say).go()


def table(r: Report) -> str:
    rows = [
        ("store", r.store), ("jobs", r.jobs), ("seconds", r.seconds),
        ("worker kills", f"{sum(r.worker_kills.values())} "
                         f"({', '.join(f'{k} {n}' for k, n in sorted(r.worker_kills.items()))})"),
        ("controller kills", f"{r.controller_kills} (reattached {r.reattaches},"
                             f" run again {r.reruns})"),
        ("server restarts", r.restarts), ("job states", r.states),
        ("attempts", f"{r.attempts} ({r.lost_attempts} lost)"),
        ("re-executions", r.reexecutions), ("losses", r.losses), ("duplicates", r.duplicates),
        ("missing logs", f"{r.missing_logs} (lost attempts that ran with no log: {r.lost_output})"),
        ("processes left", r.leftover_processes),
        ("unexpected exits", r.unexpected_exits),
        ("refused at start", r.refused_at_start),
        ("integrity_check", r.integrity or "-"),
    ]
    return "\n".join(f"{k:<18} {v}" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--kill-every", type=int, default=100,
                    help="one worker kill per this many jobs (default 100)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else secrets.randbelow(2**32)
    kills = max(1, a.jobs // a.kill_every)
    plan = Plan(jobs=a.jobs, worker_kills=kills, controller_kills=max(1, kills // 5),
                restarts=max(1, kills // 10) if a.store == "postgres" else 0,
                workers=a.workers, seed=seed, deadline=max(600.0, a.jobs * 0.2))
    with tempfile.TemporaryDirectory(prefix="jobfleet-soak-") as tmp:
        folder = Path(tmp)
        if a.store == "sqlite":
            report = soak(folder, str(folder / "jobfleet.db"), plan, say=print)
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from pg import Cluster

            cluster = Cluster(folder)
            cluster.start()
            try:
                report = soak(folder, cluster.url, plan, cluster.restart, say=print)
            finally:
                cluster.destroy()
    print(table(report))
    for line in report.problems:
        print("problem:", line)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({**asdict(report), "kills": report.kills,
                                  "plan": asdict(plan), "command": sys.argv}, indent=2))
    print(f"report written to {a.json}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
