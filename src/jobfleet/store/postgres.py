"""The networked store: PostgreSQL, shared by workers on many machines, with SQLite's semantics.

Every operation is one transaction, retried on a fresh connection if the server goes away
(see `pgconn.Connector.transact`); an operation that may have committed unheard looks for
what it did before doing it again. Workers lease with `FOR UPDATE SKIP LOCKED`, and new work
is announced with NOTIFY, so `wait_for_work` wakes a waiting worker at once.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

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
from jobfleet.store.pgconn import CHANNEL, Conn, Connector

T = TypeVar("T")
_Q = sqlfiles.queries("postgres")
#: how often one process looks for expired leases, at most
_REAP_EVERY = 1.0
#: the advisory lock that lets one process at a time migrate a database
_MIGRATION_LOCK = 0x6A6F62666C656574  # "jobfleet"
_NOTIFY = f"NOTIFY {CHANNEL}"


class PostgresStore(Store):
    """A Store in one PostgreSQL database; safe for many processes on many machines."""

    def __init__(self, url: str, *, clock: Clock = time.time, retry_for: float = 30.0) -> None:
        self._db = Connector(url, retry_for=retry_for)
        self.url = self._db.url  # the password masked: this is printed
        self.location = url
        self.clock = clock
        self._next_reap = 0.0
        self._workdirs: dict[str, str | None] = {}
        self._db.open()
        self._migrate()

    # -- plumbing ---------------------------------------------------------------------------
    def _tx(self, work: Callable[[Conn, bool], T]) -> T:
        return self._db.transact(work)

    def _read(self, work: Callable[[Conn], T]) -> T:
        return self._db.transact(lambda c, _: work(c))

    def _migrate(self) -> None:
        def migrate(c: Conn, _: bool) -> None:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations"
                      " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            done = {v for (v,) in c.execute("SELECT version FROM schema_migrations")}
            for version, script in sqlfiles.migrations("postgres"):
                if version not in done:
                    c.execute(script)
                    c.execute("INSERT INTO schema_migrations VALUES (%s, %s)",
                              (version, self.clock()))

        self._tx(migrate)

    def schema_version(self) -> int:
        row = self._read(lambda c: c.execute(
            "SELECT max(version) FROM schema_migrations").fetchone())
        return int(row[0] or 0) if row else 0

    @staticmethod
    def _event(
        c: Conn,
        now: float,
        kind: str,
        run_id: str | None,
        job_key: int | None = None,
        worker_id: str | None = None,
        **detail: object,
    ) -> None:
        c.execute(_Q["add_event"], (now, kind, run_id, job_key, worker_id,
                                    json.dumps(detail) if detail else None))

    # -- submission -------------------------------------------------------------------------
    def submit(self, run: NewRun, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None) -> str:
        specs, pays = list(jobs), None if payloads is None else list(payloads)
        if not specs:
            raise StoreError("nothing to submit: the run has no jobs")
        now = self.clock()
        chosen = run.id or secrets.token_hex(4)  # chosen once: a retry looks for it

        def submit(c: Conn, retrying: bool) -> str:
            run_id = chosen
            while row := c.execute("SELECT created_at, total FROM runs WHERE id = %s",
                                   (run_id,)).fetchone():
                if retrying and run_id == chosen and tuple(row) == (now, len(specs)):
                    return run_id  # our own earlier try committed
                if run.id:
                    raise StoreError(f"a run {run.id} exists already")
                run_id = secrets.token_hex(4)
            c.execute(_Q["add_run"], (run_id, run.name, run.source, run.workdir, now))
            total = self._insert_jobs(c, run_id, 1, specs, pays)
            self._event(c, now, "submitted", run_id, jobs=total, source=run.source)
            c.execute(_NOTIFY)
            return run_id

        return self._tx(submit)

    def append(self, run_id: str, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None, request: str | None = None) -> int:
        specs, pays = list(jobs), None if payloads is None else list(payloads)
        now = self.clock()
        earlier: list[int] = []  # the first seq an earlier try would have used

        def append(c: Conn, retrying: bool) -> int:
            row = c.execute("SELECT total FROM runs WHERE id = %s FOR UPDATE",
                            (run_id,)).fetchone()
            if row is None:
                raise NotFound(f"no run '{run_id}' in {self.url}")
            if retrying and earlier and specs and self._appended(c, run_id, earlier[0], specs):
                return earlier[0]
            first = int(row[0]) + 1
            earlier[:] = [first]
            added = self._insert_jobs(c, run_id, first, specs, pays)
            said: dict[str, object] = {"jobs": added, "first": first}
            if request:
                said["request"] = request
            self._event(c, now, "appended", run_id, None, None, **said)
            if added:
                c.execute(_NOTIFY)
            return first

        return self._tx(append)

    @staticmethod
    def _appended(c: Conn, run_id: str, first: int, specs: list[JobSpec]) -> bool:
        """Whether the jobs an earlier try appended from `first` are there already."""
        found = dict(c.execute("SELECT seq, spec FROM jobs WHERE run_id = %s AND seq IN (%s, %s)",
                               (run_id, first, first + len(specs) - 1)).fetchall())
        return (found.get(first) == specs[0].to_json()
                and found.get(first + len(specs) - 1) == specs[-1].to_json())

    @staticmethod
    def _insert_jobs(c: Conn, run_id: str, first: int, jobs: list[JobSpec],
                     payloads: list[bytes] | None) -> int:
        """Insert jobs numbered from `first`; returns how many; updates the run's total."""
        rows = [
            (run_id, seq, j.name, j.cpus, j.memory, j.gpus, j.max_attempts, j.retry_delay,
             ",".join(map(str, j.retry_on)) or None, j.to_json(),
             payloads[seq - first] if payloads is not None else None)
            for seq, j in enumerate(jobs, first)
        ]
        with c.cursor() as cur:
            cur.executemany(_Q["add_job"], rows)
        c.execute("UPDATE runs SET total = %s WHERE id = %s", (first - 1 + len(rows), run_id))
        return len(rows)

    # -- the worker's side ------------------------------------------------------------------
    def register_worker(self, w: WorkerInfo) -> None:
        def register(c: Conn, _: bool) -> None:
            c.execute(_Q["add_worker"], (
                w.id, w.host, w.pid, w.slots, w.cpus, w.memory, w.gpus, w.lease_seconds,
                w.run_id, w.state, w.started_at, w.heartbeat_at, w.jobs_done))
            self._event(c, w.started_at, "worker_started", w.run_id, None, w.id,
                        host=w.host, pid=w.pid, slots=w.slots)

        self._tx(register)

    def mark_stalled(self, worker_id: str, key: int, token: str, quiet_for: float | None) -> bool:
        now = self.clock()
        since = None if quiet_for is None else now - quiet_for

        def mark(c: Conn, _: bool) -> bool:
            row = c.execute(
                "UPDATE jobs SET stalled_since = %s WHERE id = %s AND lease_token = %s"
                " AND state = 'running' RETURNING run_id", (since, key, token)).fetchone()
            if row is not None:
                kind, detail = policy.stall_event(quiet_for)
                self._event(c, now, kind, row[0], key, worker_id, **detail)
            return row is not None

        return self._tx(mark)

    def set_worker_state(self, worker_id: str, state: str, jobs_done: int | None = None) -> None:
        now = self.clock()

        def record(c: Conn, _: bool) -> None:
            c.execute("UPDATE workers SET state = %s, heartbeat_at = %s,"
                      " jobs_done = coalesce(%s, jobs_done) WHERE id = %s",
                      (state, now, jobs_done, worker_id))
            self._event(c, now, f"worker_{state}", None, None, worker_id)

        self._tx(record)

    def lease(
        self, worker_id: str, free: Capacity, lease_seconds: float, run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> list[Lease]:
        if free.slots <= 0 and not (ahead and ahead.slots > 0):  # not even a transaction
            return []
        base = secrets.token_hex(8)
        return self._tx(lambda c, retrying: self._lease(
            c, self.clock(), worker_id, free, lease_seconds, run_id, ahead, base, retrying))

    def exchange(
        self,
        worker_id: str,
        outcomes: Sequence[Outcome],
        free: Capacity,
        lease_seconds: float,
        run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> tuple[list[int], list[Lease]]:
        base = secrets.token_hex(8)

        def exchange(c: Conn, retrying: bool) -> tuple[list[int], list[Lease]]:
            now = self.clock()  # taken inside the transaction, as SQLite does
            stale = self._finish(c, now, worker_id, outcomes, retrying)
            leases = self._lease(c, now, worker_id, free, lease_seconds, run_id, ahead, base,
                                 retrying)
            return stale, leases

        return self._tx(exchange)

    def _lease(
        self,
        c: Conn,
        now: float,
        worker_id: str,
        free: Capacity,
        lease_seconds: float,
        run_id: str | None,
        ahead: Capacity | None,
        base: str,
        retrying: bool,
    ) -> list[Lease]:
        if retrying:  # an earlier try may have leased unheard: hand those out, not more
            rows = c.execute(_Q["leased_by"], {"worker": worker_id, "token": base}).fetchall()
            if rows:
                return [self._lease_of(c, row[:7], row[7]) for row in rows]
        if now >= self._next_reap:
            self._reap(c, now)
            self._next_reap = now + _REAP_EVERY
        run_filter = "AND run_id = %(run)s" if run_id is not None else ""
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
        return [self._lease_of(c, row, now + lease_seconds) for row in rows]

    def _lease_of(self, c: Conn, row: Sequence[Any], expires: float) -> Lease:
        key, rid, seq, attempts, token, spec, payload = row
        return Lease(key, rid, seq, attempts, token, expires, JobSpec.from_json(spec),
                     self._workdir(c, rid), payload)

    def _workdir(self, c: Conn, run_id: str) -> str | None:
        """A run's folder (runs never change, so it is read once)."""
        if run_id not in self._workdirs:
            row = c.execute("SELECT workdir FROM runs WHERE id = %s", (run_id,)).fetchone()
            self._workdirs[run_id] = row[0] if row else None
        return self._workdirs[run_id]

    def heartbeat(
        self,
        worker_id: str,
        leases: Sequence[tuple[int, str]],
        lease_seconds: float,
        jobs_done: int | None = None,
    ) -> Beat:
        now = self.clock()

        def beat(c: Conn, _: bool) -> Beat:
            held = {k for (k,) in c.execute(_Q["extend"], {
                "expires": now + lease_seconds, "keys": [k for k, _ in leases],
                "tokens": [t for _, t in leases]})} if leases else set()
            c.execute(_Q["beat"], (now, jobs_done, worker_id))
            lost = frozenset(k for k, _ in leases if k not in held)
            return Beat(lost, self._cancel_requests(c, worker_id))

        return self._tx(beat)

    def cancel_requests(self, worker_id: str) -> frozenset[int]:
        return self._read(lambda c: self._cancel_requests(c, worker_id))

    @staticmethod
    def _cancel_requests(c: Conn, worker_id: str) -> frozenset[int]:
        return frozenset(k for (k,) in c.execute(
            "SELECT id FROM jobs WHERE state = 'running' AND cancel_requested"
            " AND worker_id = %s", (worker_id,)))

    def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[int]:
        return self._tx(lambda c, retrying: self._finish(c, self.clock(), worker_id, outcomes,
                                                         retrying))

    def _finish(
        self, c: Conn, now: float, worker_id: str, outcomes: Sequence[Outcome], retrying: bool,
    ) -> list[int]:
        recorded = self._succeed(c, now, worker_id, [o for o in outcomes if o.status == SUCCEEDED])
        recorded |= {o.key for o in outcomes
                     if o.status != SUCCEEDED and self._finish_one(c, now, worker_id, o)}
        return [o.key for o in outcomes if o.key not in recorded and not (
            # not ours any more, unless an earlier try recorded it
            retrying and c.execute(_Q["recorded"], (o.key, o.token)).fetchone())]

    @staticmethod
    def _succeed(c: Conn, now: float, worker_id: str, done: list[Outcome]) -> set[int]:
        """Record the successes whose token still holds the lease, in one statement (the hot
        path); returns their keys."""
        if not done:
            return set()
        return {k for (k,) in c.execute(_Q["succeed"], {
            "now": now, "worker": worker_id, "keys": [o.key for o in done],
            "tokens": [o.token for o in done], "exit_codes": [o.exit_code for o in done],
            "started": [o.started_at for o in done], "results": [o.result for o in done],
            "peak_rss": [o.peak_rss for o in done], "logs": [o.log for o in done]})}

    def _finish_one(self, c: Conn, now: float, worker_id: str, o: Outcome) -> bool:
        """Record one outcome other than success if its token still holds the lease; whether
        it did."""
        if o.status == UNSTARTED:
            back = c.execute(_Q["hand_back"], {"key": o.key, "token": o.token, "now": now}
                             ).fetchone()
            if back is not None and back[0] == QUEUED:
                c.execute(_NOTIFY)
            return back is not None
        row = c.execute(_Q["running"] + " AND id = %s AND lease_token = %s FOR UPDATE",
                        (o.key, o.token)).fetchone()
        if row is None:
            return False
        if o.started_at is not None:  # row[-2]: when the lease was handed out
            row = (*row[:-2], o.started_at, row[-1])
        self._settle(c, now, o.key, row[2:], o.status, o.exit_code, o.signal, o.reason,
                     o.peak_rss, o.log, worker_id, o.result)
        return True

    def _settle(
        self,
        c: Conn,
        now: float,
        key: int,
        row: Sequence[Any],
        status: str,
        exit_code: int | None,
        signal: int | None,
        reason: str | None,
        peak_rss: int | None,
        log: str | None,
        worker_id: str | None,
        result: bytes | None = None,
    ) -> None:
        """End the running attempt of job `key` (its row locked) with `status`; move the job on."""
        (run_id, attempts, budget_from, max_attempts, retry_on, retry_delay, cancel_req,
         started_at, token) = row
        if status == "released":
            state, not_before, budget_from = QUEUED, now, budget_from + 1
        else:
            if reason and reason.startswith(policy.SANDBOX_ERROR):
                found = c.execute(
                    "SELECT count(*) FROM attempts WHERE job_id = %s AND reason LIKE %s",
                    (key, policy.SANDBOX_ERROR + "%")).fetchone()
                if found is not None and policy.uncounted(status, reason, found[0]):
                    budget_from += 1
            state, not_before = policy.after_attempt(
                status, exit_code=exit_code, used=attempts - budget_from,
                max_attempts=max_attempts, retry_on=retry_on, retry_delay=retry_delay,
                cancel_requested=bool(cancel_req), now=now)
        c.execute(_Q["settle"], (state, not_before, budget_from, exit_code, signal, reason,
                                 started_at, None if state == QUEUED else now, result, key))
        c.execute(_Q["add_attempt"], (key, attempts, worker_id, token, status, started_at, now,
                                      exit_code, signal, reason, peak_rss, log))
        if state == QUEUED:
            c.execute(_NOTIFY)
        kind, detail = policy.ended_event(status, state, not_before, attempt=attempts,
                                          exit_code=exit_code, signal=signal, reason=reason)
        self._event(c, now, kind, run_id, key, worker_id, **detail)

    def reap(self) -> int:
        return self._tx(lambda c, _: self._reap(c, self.clock()))

    def _reap(self, c: Conn, now: float, worker_id: str | None = None,
              reason: str | None = None) -> int:
        if worker_id is None:  # leases another process is settling right now are its own
            rows = c.execute(_Q["running"] + " AND lease_expires < %s FOR UPDATE SKIP LOCKED",
                             (now,)).fetchall()
        else:
            rows = c.execute(_Q["running"] + " AND worker_id = %s FOR UPDATE",
                             (worker_id,)).fetchall()
        for key, wid, *row in rows:
            why = reason or f"worker {wid} lost: its lease expired"
            self._settle(c, now, key, row, "lost", None, None, why, None, None, wid)
        return len(rows)

    def next_due(self, total: Capacity, run_id: str | None = None) -> float | None:
        sql = ("SELECT min(not_before) FROM jobs WHERE state = 'queued'"
               " AND cpus <= %s AND memory <= %s AND gpus <= %s")
        args: list[Any] = [total.cpus, total.memory, total.gpus]
        if run_id is not None:
            sql += " AND run_id = %s"
            args.append(run_id)
        row = self._read(lambda c: c.execute(sql, args).fetchone())
        due = row[0] if row else None
        return None if due is None else float(due)

    def forget_worker(self, worker_id: str, reason: str) -> int:
        def forget(c: Conn, _: bool) -> int:
            c.execute("UPDATE workers SET state = 'lost' WHERE id = %s", (worker_id,))
            return self._reap(c, self.clock(), worker_id, reason)

        return self._tx(forget)

    hears_work = True

    def wait_for_work(self, timeout: float, also: int | None = None) -> None:
        """Block until a submit, append, retry or a job going back to the queue is announced
        (anywhere), or `timeout` seconds pass. The first call only starts listening and
        returns at once, as it does after the listening connection was lost."""
        self._db.wait(timeout, also)

    # -- the user's side --------------------------------------------------------------------
    def _all(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        return self._read(lambda c: c.execute(sql, args).fetchall())

    @staticmethod
    def _run(row: Sequence[Any]) -> Run:
        rid, name, source, workdir, created, total, cancelled, stopped = row
        return Run(rid, name, source, workdir, created, total, bool(cancelled), stopped)

    def runs(self, limit: int = 50) -> list[Run]:
        return [self._run(r) for r in self._all(
            _Q["run"] + " ORDER BY created_at DESC LIMIT %s", (limit,))]

    def _runs_by_prefix(self, prefix: str) -> list[Run]:
        return [self._run(r) for r in self._all(
            _Q["run"] + " WHERE id LIKE %s ORDER BY id LIMIT 2", (prefix + "%",))]

    def pending(self, run_id: str) -> int | None:
        [(exists, n)] = self._all(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE id = %s), count(*) FROM jobs"
            " WHERE run_id = %s AND state IN ('queued', 'running')", (run_id, run_id))
        return int(n) if exists else None

    def add_usage(self, run_id: str, instance_type: str, worker_seconds: float,
                  cost: float) -> None:
        self._tx(lambda c, _: c.execute(_Q["add_usage"],
                                        (run_id, instance_type, worker_seconds, cost)))

    def usage(self, run_id: str) -> list[Usage]:
        return [Usage(*r) for r in self._all(
            "SELECT instance_type, worker_seconds, cost FROM usage WHERE run_id = %s"
            " ORDER BY instance_type", (run_id,))]

    def stop_run(self, run_id: str, reason: str | None) -> None:
        now = self.clock()

        def stop(c: Conn, _: bool) -> None:
            c.execute("UPDATE runs SET stopped = %s WHERE id = %s", (reason, run_id))
            if reason:
                self._event(c, now, "run_stopped", run_id, reason=reason)
            else:
                self._event(c, now, "run_resumed", run_id)

        self._tx(stop)

    def _rows(self, sql: str, run_id: str | None) -> list[tuple[Any, ...]]:
        if run_id is None:
            return self._all(sql.format(run=""))
        return self._all(sql.format(run=" AND run_id = %s"), (run_id,))

    def counts(self, run_id: str) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update((state, int(n)) for state, n in self._all(
            "SELECT state, count(*) FROM jobs WHERE run_id = %s GROUP BY state", (run_id,)))
        return counts

    def ended(self, run_id: str, since: float = 0.0, results: bool = True) -> list[Ended]:
        result = "result" if results else "NULL::bytea"
        return [Ended(*r) for r in self._all(
            f"SELECT seq, state, reason, {result}, finished_at FROM jobs WHERE run_id = %s"
            " AND finished_at >= %s AND state IN ('succeeded', 'failed', 'cancelled', 'skipped')",
            (run_id, since))]

    def clear_results(self, run_id: str) -> int:
        return self._tx(lambda c, _: c.execute(
            "UPDATE jobs SET payload = NULL, result = NULL WHERE run_id = %s"
            " AND (payload IS NOT NULL OR result IS NOT NULL)", (run_id,)).rowcount)

    def jobs(self, run_id: str, state: str | None = None, limit: int | None = None) -> list[Job]:
        sql = _Q["job"] + " WHERE j.run_id = %s"
        args: list[Any] = [run_id]
        if state == STALLED:
            sql += " AND j.state = 'running' AND j.stalled_since IS NOT NULL"
        elif state is not None:
            sql += " AND j.state = %s"
            args.append(state)
        sql += " ORDER BY j.seq LIMIT %s"
        args.append(limit)  # NULL: no limit
        return [Job(*r) for r in self._all(sql, args)]

    def _job_at(self, run_id: str, seq: int) -> Job | None:
        rows = self._all(_Q["job"] + " WHERE j.run_id = %s AND j.seq = %s", (run_id, seq))
        return Job(*rows[0]) if rows else None

    def attempts(self, job_key: int) -> list[Attempt]:
        return [Attempt(*r) for r in self._all(_Q["attempts"], {"key": job_key})]

    def events(self, run_id: str | None = None, job_key: int | None = None) -> list[Event]:
        def where(job_column: str, run_column: str) -> tuple[str, list[Any]]:
            if job_key is not None:
                return f" AND {job_column} = %s", [job_key]
            if run_id is not None:
                return f" AND {run_column} = %s", [run_id]
            return "", []

        cond, args = where("job_id", "run_id")
        ended, ended_args = where("a.job_id", "j.run_id")
        under_way, under_way_args = where("id", "run_id")
        logged = self._all("SELECT at, kind, run_id, job_id, worker_id, detail FROM events"
                           f" WHERE true{cond} ORDER BY id", args)
        found = [Event(at, kind, rid, jk, wid, Event.detail_of(d))
                 for at, kind, rid, jk, wid, d in logged]
        for key, rid, number, wid, started, finished, state, code in self._all(
                _Q["events"].format(ended=ended, under_way=under_way),
                ended_args + under_way_args):
            found.append(Event(started, "leased", rid, key, wid, {"attempt": number}))
            if state == SUCCEEDED:
                found.append(Event(finished, SUCCEEDED, rid, key, wid,
                                   {"attempt": number, "exit_code": code}))
        found.sort(key=lambda e: e.at)
        return found

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(*r) for r in self._all(_Q["worker"] + " ORDER BY started_at DESC")]

    def retry(self, run_id: str, job_key: int | None = None) -> int:
        now = self.clock()
        sql = (
            "UPDATE jobs SET state = 'queued', budget_from = attempts, not_before = 0,"
            " cancel_requested = false, exit_code = NULL, signal = NULL, reason = NULL,"
            " finished_at = NULL WHERE run_id = %s AND state = 'failed'"
        )
        args: list[Any] = [run_id]
        if job_key is not None:
            sql = sql.replace("state = 'failed'", "state IN ('failed', 'cancelled')")
            sql += " AND id = %s"
            args.append(job_key)

        def retry(c: Conn, _: bool) -> int:
            n = c.execute(sql, args).rowcount
            c.execute("UPDATE runs SET cancelled = false WHERE id = %s", (run_id,))
            self._event(c, now, "retried", run_id, job_key, jobs=n)
            if n:
                c.execute(_NOTIFY)
            return n

        return self._tx(retry)

    def cancel(self, run_id: str, job_key: int | None = None) -> tuple[int, int]:
        now = self.clock()
        where, args = "run_id = %s", list[Any]([run_id])
        if job_key is not None:
            where += " AND id = %s"
            args.append(job_key)

        def cancel(c: Conn, _: bool) -> tuple[int, int]:
            done = c.execute(
                f"UPDATE jobs SET state = '{CANCELLED}', finished_at = %s,"
                f" reason = 'cancelled by user' WHERE {where} AND state = '{QUEUED}'",
                [now, *args],
            ).rowcount
            asked = c.execute(
                f"UPDATE jobs SET cancel_requested = true WHERE {where}"
                f" AND state = '{RUNNING}'", args,
            ).rowcount
            if job_key is None and done + asked:
                c.execute("UPDATE runs SET cancelled = true WHERE id = %s", (run_id,))
            self._event(c, now, "cancel", run_id, job_key, cancelled=done, asked=asked)
            return done, asked

        return self._tx(cancel)

    def close(self) -> None:
        self._db.close()
