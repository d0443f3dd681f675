"""The embedded store: one SQLite file in WAL mode, shared by every process on this machine."""

from __future__ import annotations

import json
import secrets
import select
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from jobfleet.errors import NotFound, StoreError
from jobfleet.spec.model import JobSpec
from jobfleet.store import policy, sqlfiles
from jobfleet.store.base import (
    CANCELLED,
    QUEUED,
    RUNNING,
    STALLED,
    STATES,
    SUCCEEDED,
    UNSTARTED,
    Attempt,
    Beat,
    Capacity,
    Clock,
    Ended,
    Event,
    Job,
    Lease,
    NewRun,
    Outcome,
    Run,
    Store,
    Usage,
    WorkerInfo,
)
from jobfleet.store.watch import FileWatch, watch_file

_Q = sqlfiles.queries("sqlite")
#: how often one process looks for expired leases, at most
_REAP_EVERY = 1.0
_INSERT_JOBS = ("INSERT INTO jobs (run_id, seq, name, cpus, memory, gpus, max_attempts,"
                " retry_delay, retry_on, spec, payload) VALUES ")
_JOB_VALUES = "(?,?,?,?,?,?,?,?,?,?,?)"
#: jobs per INSERT when submitting: one statement of many rows costs SQLite 40% less a row than
#: a statement a row (a million-job submit: 6 s less); 1,100 values, far below SQLite's limit
_INSERT_ROWS = 100
_INSERT_MANY = _INSERT_JOBS + ",".join([_JOB_VALUES] * _INSERT_ROWS)


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL. Processes creating it at the same moment may find it locked:
    the busy timeout does not cover this switch, so it is tried again for a while."""
    deadline = time.monotonic() + 60
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore(Store):
    """A Store in one SQLite file; safe for many processes (WAL, immediate transactions)."""

    def __init__(self, path: str | Path, *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.url = f"sqlite://{self.path}"
        self.location = str(self.path.absolute())
        self.clock = clock
        self._lock = threading.RLock()
        self._next_reap = 0.0
        self._workdirs: dict[str, str | None] = {}
        self._watch: FileWatch | None | Literal[False] = None  # False: inotify is unavailable
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=60, check_same_thread=False
            )
            _use_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(
                f"cannot open the store {self.path}: {e}",
                hint="check that the folder exists and is writable, or pass --store URL",
            ) from None

    # -- plumbing ---------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {v for (v,) in c.execute("SELECT version FROM schema_migrations")}
            for version, script in sqlfiles.migrations("sqlite"):
                if version in done:
                    continue
                for statement in _statements(script):
                    c.execute(statement)
                c.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, self.clock()))

    def schema_version(self) -> int:
        (v,) = self._db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(v or 0)

    @staticmethod
    def _event(
        c: sqlite3.Connection,
        now: float,
        kind: str,
        run_id: str | None,
        job_key: int | None = None,
        worker_id: str | None = None,
        **detail: object,
    ) -> None:
        c.execute(
            "INSERT INTO events (at, kind, run_id, job_id, worker_id, detail) VALUES (?,?,?,?,?,?)",
            (now, kind, run_id, job_key, worker_id, json.dumps(detail) if detail else None),
        )

    # -- submission -------------------------------------------------------------------------
    def submit(self, run: NewRun, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None) -> str:
        now = self.clock()
        with self._tx() as c:
            run_id = run.id or secrets.token_hex(4)
            while c.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                if run.id:
                    raise StoreError(f"a run {run.id} exists already")
                run_id = secrets.token_hex(4)
            c.execute(
                "INSERT INTO runs (id, name, source, workdir, created_at, total)"
                " VALUES (?,?,?,?,?,0)",
                (run_id, run.name, run.source, run.workdir, now),
            )
            total = self._insert_jobs(c, run_id, 1, jobs, payloads)
            if total == 0:
                raise StoreError("nothing to submit: the run has no jobs")
            self._event(c, now, "submitted", run_id, jobs=total, source=run.source)
        return run_id

    def append(self, run_id: str, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None, request: str | None = None) -> int:
        now = self.clock()
        with self._tx() as c:
            row = c.execute("SELECT total FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound(f"no run '{run_id}' in {self.path}")
            first = row[0] + 1
            added = self._insert_jobs(c, run_id, first, jobs, payloads)
            said: dict[str, object] = {"jobs": added, "first": first}
            if request:
                said["request"] = request
            self._event(c, now, "appended", run_id, None, None, **said)
        return int(first)

    @staticmethod
    def _insert_jobs(c: sqlite3.Connection, run_id: str, first: int, jobs: Iterable[JobSpec],
                     payloads: Iterable[bytes] | None) -> int:
        """Insert jobs numbered from `first`; returns how many; updates the run's total."""
        pay = iter(payloads) if payloads is not None else None
        values: list[object] = []
        count = 0
        for seq, j in enumerate(jobs, first):
            values += (run_id, seq, j.name, j.cpus, j.memory, j.gpus, j.max_attempts,
                       j.retry_delay, ",".join(map(str, j.retry_on)) if j.retry_on else None,
                       j.to_json(), next(pay) if pay is not None else None)
            count += 1
            if count == _INSERT_ROWS:
                c.execute(_INSERT_MANY, values)
                values, count = [], 0
        if count:
            c.execute(_INSERT_JOBS + ",".join([_JOB_VALUES] * count), values)
        (total,) = c.execute("SELECT count(*) FROM jobs WHERE run_id = ?", (run_id,)).fetchone()
        c.execute("UPDATE runs SET total = ? WHERE id = ?", (total, run_id))
        return int(total) - first + 1

    # -- the worker's side ------------------------------------------------------------------
    def register_worker(self, w: WorkerInfo) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO workers VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (w.id, w.host, w.pid, w.slots, w.cpus, w.memory, w.gpus, w.lease_seconds,
                 w.run_id, w.state,
                 w.started_at, w.heartbeat_at, w.jobs_done),
            )
            self._event(c, w.started_at, "worker_started", w.run_id, None, w.id,
                        host=w.host, pid=w.pid, slots=w.slots)

    def set_worker_state(self, worker_id: str, state: str, jobs_done: int | None = None) -> None:
        now = self.clock()
        with self._tx() as c:
            c.execute("UPDATE workers SET state = ?, heartbeat_at = ?,"
                      " jobs_done = coalesce(?, jobs_done) WHERE id = ?",
                      (state, now, jobs_done, worker_id))
            self._event(c, now, f"worker_{state}", None, None, worker_id)

    def lease(
        self, worker_id: str, free: Capacity, lease_seconds: float, run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> list[Lease]:
        if free.slots <= 0 and not (ahead and ahead.slots > 0):  # not even a transaction
            return []
        with self._tx() as c:
            return self._lease(c, self.clock(), worker_id, free, lease_seconds, run_id, ahead)

    def exchange(
        self,
        worker_id: str,
        outcomes: Sequence[Outcome],
        free: Capacity,
        lease_seconds: float,
        run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> tuple[list[int], list[Lease]]:
        with self._tx() as c:
            now = self.clock()  # taken holding the lock: readers see it committed at once
            stale = self._finish(c, now, worker_id, outcomes)
            leases = self._lease(c, now, worker_id, free, lease_seconds, run_id, ahead)
        return stale, leases

    def _lease(
        self,
        c: sqlite3.Connection,
        now: float,
        worker_id: str,
        free: Capacity,
        lease_seconds: float,
        run_id: str | None,
        ahead: Capacity | None = None,
    ) -> list[Lease]:
        if now >= self._next_reap:
            self._reap(c, now)
            self._next_reap = now + _REAP_EVERY
        run_filter = "AND run_id = :run" if run_id is not None else ""
        base = secrets.token_hex(8)
        rows = []
        for pick, want in (("fitting_together", free), ("fitting_alone", ahead)):
            if want is None or want.slots <= 0:
                continue
            sql = _Q["lease"].format(pick=_Q[pick].format(run_filter=run_filter))
            rows += c.execute(sql, {
                "worker": worker_id, "token": base, "expires": now + lease_seconds, "now": now,
                "run": run_id, "cpus": want.cpus, "memory": want.memory, "gpus": want.gpus,
                "slots": want.slots,
            }).fetchall()
        rows.sort()
        return [Lease(key, rid, seq, attempts, token, now + lease_seconds,
                      JobSpec.from_json(spec), self._workdir(c, rid), payload)
                for key, rid, seq, attempts, token, spec, payload in rows]

    def _workdir(self, c: sqlite3.Connection, run_id: str) -> str | None:
        """A run's folder (runs never change, so it is read once)."""
        if run_id not in self._workdirs:
            (self._workdirs[run_id],) = c.execute(
                "SELECT workdir FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._workdirs[run_id]

    def heartbeat(
        self,
        worker_id: str,
        leases: Sequence[tuple[int, str]],
        lease_seconds: float,
        jobs_done: int | None = None,
    ) -> Beat:
        now = self.clock()
        lost = set()
        with self._tx() as c:
            for key, token in leases:
                cur = c.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_token = ?"
                    " AND state = 'running'",
                    (now + lease_seconds, key, token),
                )
                if cur.rowcount == 0:
                    lost.add(key)
            c.execute("UPDATE workers SET heartbeat_at = ?, jobs_done = coalesce(?, jobs_done)"
                      " WHERE id = ?", (now, jobs_done, worker_id))
        return Beat(frozenset(lost), self.cancel_requests(worker_id))

    def mark_stalled(self, worker_id: str, key: int, token: str, quiet_for: float | None) -> bool:
        now = self.clock()
        since = None if quiet_for is None else now - quiet_for
        with self._tx() as c:
            row = c.execute(
                "UPDATE jobs SET stalled_since = ? WHERE id = ? AND lease_token = ?"
                " AND state = 'running' RETURNING run_id", (since, key, token)).fetchone()
            if row is not None:
                kind, detail = policy.stall_event(quiet_for)
                self._event(c, now, kind, row[0], key, worker_id, **detail)
        return row is not None

    def cancel_requests(self, worker_id: str) -> frozenset[int]:
        return frozenset(k for (k,) in self._db.execute(
            "SELECT id FROM jobs WHERE state = 'running' AND cancel_requested = 1"
            " AND worker_id = ?", (worker_id,)))

    def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[int]:
        with self._tx() as c:
            now = self.clock()
            return self._finish(c, now, worker_id, outcomes)

    def _finish(
        self, c: sqlite3.Connection, now: float, worker_id: str, outcomes: Sequence[Outcome]
    ) -> list[int]:
        done = [o for o in outcomes if o.status == SUCCEEDED]
        stale = self._succeed(c, now, worker_id, done) if done else []
        for o in outcomes:
            if o.status == SUCCEEDED:
                continue
            if o.status == UNSTARTED:
                if not c.execute(_Q["hand_back"], {"key": o.key, "token": o.token, "now": now}
                                 ).rowcount:
                    stale.append(o.key)
                continue
            row = c.execute(_Q["running"] + " AND id = ? AND lease_token = ?",
                            (o.key, o.token)).fetchone()
            if row is None:
                stale.append(o.key)
                continue
            if o.started_at is not None:  # row[-2]: when the lease was handed out
                row = (*row[:-2], o.started_at, row[-1])
            self._settle(c, now, o.key, row[2:], o.status, o.exit_code, o.signal, o.reason,
                         o.peak_rss, o.log, worker_id, o.result)
        return stale

    @staticmethod
    def _succeed(c: sqlite3.Connection, now: float, worker_id: str, done: list[Outcome]
                 ) -> list[int]:
        """The hot path: successes settled by two statements for the whole batch (the attempt
        is written from the job's row while it is still leased, then the job). Returns the
        keys whose lease was lost."""
        c.executemany(_Q["add_success"], [
            (worker_id, o.started_at, now, o.exit_code, o.peak_rss, o.log, o.key, o.token)
            for o in done])
        settled = c.executemany(_Q["succeed"], [
            (o.exit_code, o.started_at, now, o.result, o.key, o.token) for o in done]).rowcount
        if settled == len(done):
            return []
        return [o.key for o in done if c.execute(  # rare: which leases were lost?
            "SELECT 1 FROM attempts WHERE job_id = ? AND token = ? AND state = ?",
            (o.key, o.token, SUCCEEDED)
        ).fetchone() is None]

    def _settle(
        self,
        c: sqlite3.Connection,
        now: float,
        key: int,
        row: tuple[Any, ...],
        status: str,
        exit_code: int | None,
        signal: int | None,
        reason: str | None,
        peak_rss: int | None,
        log: str | None,
        worker_id: str | None,
        result: bytes | None = None,
    ) -> None:
        """End the running attempt of job `key` with `status` and move the job on."""
        (run_id, attempts, budget_from, max_attempts, retry_on, retry_delay, cancel_req,
         started_at, token) = row
        if status == "released":
            state, not_before, budget_from = QUEUED, now, budget_from + 1
        else:
            if reason and reason.startswith(policy.SANDBOX_ERROR):
                (earlier,) = c.execute(
                    "SELECT count(*) FROM attempts WHERE job_id = ? AND reason LIKE ?",
                    (key, policy.SANDBOX_ERROR + "%")).fetchone()
                if policy.uncounted(status, reason, earlier):
                    budget_from += 1
            state, not_before = policy.after_attempt(
                status, exit_code=exit_code, used=attempts - budget_from,
                max_attempts=max_attempts, retry_on=retry_on, retry_delay=retry_delay,
                cancel_requested=bool(cancel_req), now=now)
        c.execute(
            "UPDATE jobs SET state = ?, not_before = ?, budget_from = ?, lease_token = NULL,"
            " lease_expires = NULL, exit_code = ?, signal = ?, reason = ?, started_at = ?,"
            " finished_at = ?, result = ? WHERE id = ?",
            (state, not_before, budget_from, exit_code, signal, reason, started_at,
             None if state == QUEUED else now, result, key),
        )
        c.execute(_Q["add_attempt"], (key, attempts, worker_id, token, status, started_at, now,
                                 exit_code, signal, reason, peak_rss, log))
        kind, detail = policy.ended_event(status, state, not_before, attempt=attempts,
                                          exit_code=exit_code, signal=signal, reason=reason)
        self._event(c, now, kind, run_id, key, worker_id, **detail)

    def reap(self) -> int:
        now = self.clock()
        with self._tx() as c:
            return self._reap(c, now)

    def _reap(self, c: sqlite3.Connection, now: float, worker_id: str | None = None,
              reason: str | None = None) -> int:
        if worker_id is None:
            rows = c.execute(_Q["running"] + " AND lease_expires < ?", (now,)).fetchall()
        else:
            rows = c.execute(_Q["running"] + " AND worker_id = ?", (worker_id,)).fetchall()
        for key, wid, *row in rows:
            why = reason or f"worker {wid} lost: its lease expired"
            self._settle(c, now, key, tuple(row), "lost", None, None, why, None, None, wid)
        return len(rows)

    def next_due(self, total: Capacity, run_id: str | None = None) -> float | None:
        sql = ("SELECT min(not_before) FROM jobs WHERE state = 'queued'"
               " AND cpus <= ? AND memory <= ? AND gpus <= ?")
        args: list[Any] = [total.cpus, total.memory, total.gpus]
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(run_id)
        (due,) = self._db.execute(sql, args).fetchone()
        return None if due is None else float(due)

    def forget_worker(self, worker_id: str, reason: str) -> int:
        now = self.clock()
        with self._tx() as c:
            c.execute("UPDATE workers SET state = 'lost' WHERE id = ?", (worker_id,))
            return self._reap(c, now, worker_id, reason)

    # -- the user's side --------------------------------------------------------------------
    @staticmethod
    def _run(row: tuple[Any, ...]) -> Run:
        rid, name, source, workdir, created, total, cancelled, stopped = row
        return Run(rid, name, source, workdir, created, total, bool(cancelled), stopped)

    def runs(self, limit: int = 50) -> list[Run]:
        return [self._run(r) for r in self._db.execute(
            "SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))]

    def _runs_by_prefix(self, prefix: str) -> list[Run]:
        return [self._run(r) for r in self._db.execute(
            "SELECT * FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
            (prefix, prefix + "~"))]

    def pending(self, run_id: str) -> int | None:
        if not self._db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
            return None
        (n,) = self._db.execute(
            "SELECT count(*) FROM jobs WHERE run_id = ? AND state IN ('queued', 'running')",
            (run_id,)).fetchone()
        return int(n)

    def add_usage(self, run_id: str, instance_type: str, worker_seconds: float,
                  cost: float) -> None:
        with self._tx() as c:
            c.execute(_Q["add_usage"], (run_id, instance_type, worker_seconds, cost))

    def usage(self, run_id: str) -> list[Usage]:
        return [Usage(*r) for r in self._db.execute(
            "SELECT instance_type, worker_seconds, cost FROM usage WHERE run_id = ?"
            " ORDER BY instance_type", (run_id,))]

    def stop_run(self, run_id: str, reason: str | None) -> None:
        now = self.clock()
        with self._tx() as c:
            c.execute("UPDATE runs SET stopped = ? WHERE id = ?", (reason, run_id))
            if reason:
                self._event(c, now, "run_stopped", run_id, reason=reason)
            else:
                self._event(c, now, "run_resumed", run_id)

    def _rows(self, sql: str, run_id: str | None) -> list[tuple[Any, ...]]:
        if run_id is None:
            return self._db.execute(sql.format(run="")).fetchall()
        return self._db.execute(sql.format(run=" AND run_id = ?"), (run_id,)).fetchall()

    def counts(self, run_id: str) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._db.execute(
            "SELECT state, count(*) FROM jobs WHERE run_id = ? GROUP BY state", (run_id,)))
        return counts

    def ended(self, run_id: str, since: float = 0.0, results: bool = True) -> list[Ended]:
        result = "result" if results else "NULL"
        return [Ended(*r) for r in self._db.execute(
            f"SELECT seq, state, reason, {result}, finished_at FROM jobs WHERE run_id = ?"
            " AND finished_at >= ? AND state IN ('succeeded', 'failed', 'cancelled', 'skipped')",
            (run_id, since))]

    def clear_results(self, run_id: str) -> int:
        with self._tx() as c:
            return int(c.execute(
                "UPDATE jobs SET payload = NULL, result = NULL WHERE run_id = ?"
                " AND (payload IS NOT NULL OR result IS NOT NULL)", (run_id,)).rowcount)

    @staticmethod
    def _job(row: tuple[Any, ...]) -> Job:
        return Job(*row)

    def jobs(self, run_id: str, state: str | None = None, limit: int | None = None) -> list[Job]:
        sql = _Q["job"] + " WHERE j.run_id = ?"
        args: list[Any] = [run_id]
        if state == STALLED:
            sql += " AND j.state = 'running' AND j.stalled_since IS NOT NULL"
        elif state is not None:
            sql += " AND j.state = ?"
            args.append(state)
        sql += " ORDER BY j.seq LIMIT ?"
        args.append(-1 if limit is None else limit)
        return [self._job(r) for r in self._db.execute(sql, args)]

    def _job_at(self, run_id: str, seq: int) -> Job | None:
        row = self._db.execute(_Q["job"] + " WHERE j.run_id = ? AND j.seq = ?",
                               (run_id, seq)).fetchone()
        return None if row is None else self._job(row)

    def attempts(self, job_key: int) -> list[Attempt]:
        found = [Attempt(*r) for r in self._db.execute(
            "SELECT job_id, number, worker_id, state, started_at, finished_at, exit_code, signal,"
            " reason, peak_rss, log FROM attempts WHERE job_id = ? ORDER BY number", (job_key,))]
        running = self._db.execute(
            "SELECT attempts, worker_id, started_at FROM jobs WHERE id = ? AND state = 'running'",
            (job_key,)).fetchone()
        if running:
            number, worker_id, started_at = running
            found.append(Attempt(job_key, number, worker_id, "running", started_at, None, None,
                                 None, None, None, None))
        return found

    def events(self, run_id: str | None = None, job_key: int | None = None) -> list[Event]:
        def where(job_column: str, run_column: str) -> tuple[str, list[Any]]:
            if job_key is not None:
                return f" AND {job_column} = ?", [job_key]
            if run_id is not None:
                return f" AND {run_column} = ?", [run_id]
            return "", []

        cond, args = where("job_id", "run_id")
        found = [Event(at, kind, rid, jk, wid, Event.detail_of(d)) for at, kind, rid, jk, wid, d
                 in self._db.execute("SELECT at, kind, run_id, job_id, worker_id, detail"
                                     f" FROM events WHERE 1{cond} ORDER BY id", args)]
        # leases and successes are recorded once, in the attempts table (or, for the attempt
        # under way, in its job's row)
        ended, ended_args = where("a.job_id", "j.run_id")
        under_way, under_way_args = where("id", "run_id")
        for key, rid, number, wid, started, finished, state, code in self._db.execute(
            "SELECT a.job_id, j.run_id, a.number, a.worker_id, a.started_at, a.finished_at,"
            f" a.state, a.exit_code FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE 1{ended}"
            " UNION ALL SELECT id, run_id, attempts, worker_id, started_at, NULL, state, NULL"
            f" FROM jobs WHERE state = 'running'{under_way}", ended_args + under_way_args,
        ):
            found.append(Event(started, "leased", rid, key, wid, {"attempt": number}))
            if state == SUCCEEDED:
                found.append(Event(finished, SUCCEEDED, rid, key, wid,
                                   {"attempt": number, "exit_code": code}))
        found.sort(key=lambda e: e.at)
        return found

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(*r) for r in self._db.execute(
            "SELECT * FROM workers ORDER BY started_at DESC")]

    def retry(self, run_id: str, job_key: int | None = None) -> int:
        now = self.clock()
        with self._tx() as c:
            sql = (
                "UPDATE jobs SET state = 'queued', budget_from = attempts, not_before = 0,"
                " cancel_requested = 0, exit_code = NULL, signal = NULL, reason = NULL,"
                " finished_at = NULL WHERE run_id = ? AND state = 'failed'"
            )
            args: list[Any] = [run_id]
            if job_key is not None:
                sql = sql.replace("state = 'failed'", "state IN ('failed', 'cancelled')")
                sql += " AND id = ?"
                args.append(job_key)
            n = c.execute(sql, args).rowcount
            c.execute("UPDATE runs SET cancelled = 0 WHERE id = ?", (run_id,))
            self._event(c, now, "retried", run_id, job_key, jobs=n)
        return n

    def cancel(self, run_id: str, job_key: int | None = None) -> tuple[int, int]:
        now = self.clock()
        where, args = "run_id = ?", list[Any]([run_id])
        if job_key is not None:
            where += " AND id = ?"
            args.append(job_key)
        with self._tx() as c:
            done = c.execute(
                f"UPDATE jobs SET state = '{CANCELLED}', finished_at = ?,"
                f" reason = 'cancelled by user' WHERE {where} AND state = '{QUEUED}'",
                [now, *args],
            ).rowcount
            asked = c.execute(
                f"UPDATE jobs SET cancel_requested = 1 WHERE {where} AND state = '{RUNNING}'",
                args,
            ).rowcount
            if job_key is None and done + asked:
                c.execute("UPDATE runs SET cancelled = 1 WHERE id = ?", (run_id,))
            self._event(c, now, "cancel", run_id, job_key, cancelled=done, asked=asked)
        return done, asked

    @property
    def hears_work(self) -> bool:  # type: ignore[override]
        return self._watch is not False

    def wait_for_work(self, timeout: float, also: int | None = None) -> None:
        """Wait for a write to the database file (inotify on its folder): every commit
        anywhere, new work included. The first call only starts watching and returns."""
        if self._watch is None:
            self._watch = watch_file(self.path) or False
            return
        if self._watch is False:
            return
        poller = select.poll()
        poller.register(self._watch.fileno(), select.POLLIN)
        if also is not None:
            poller.register(also, select.POLLIN)
        if poller.poll(max(0, round(timeout * 1000))):
            self._watch.clear()

    def close(self) -> None:
        if self._watch:
            self._watch.close()
        self._db.close()
