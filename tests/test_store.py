"""The store contract: queue semantics every store must keep, written once for all backends.

Every test runs against each backend in `BACKENDS`: SQLite in tmp_path, and PostgreSQL in a
fresh database on the server `JOBFLEET_TEST_PG` names (skipped without one, except in CI). The
tests talk only to the `Store` interface, with an injected clock so lease expiry and backoff
are tested without waiting.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from jobfleet.errors import NotFound, StoreError
from jobfleet.spec import JobSpec, make_job
from jobfleet.store import STALLED, UNSTARTED, Capacity, NewRun, Outcome, Store, open_store, sqlfiles
from jobfleet.store.sqlite import SQLiteStore
from pg import Cluster, free_port, fresh_database, require_server

BIG = Capacity(slots=100, cpus=100, memory=10**12, gpus=8)
BACKENDS = ["sqlite", "postgres"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def job(command: str = "true", **fields: object) -> JobSpec:
    return make_job(command, fields, {}, {})


def open_at(url: str, clock: Clock | None = None, **options: Any) -> Store:
    """The store at `url` (a `sqlite://` path or a PostgreSQL URL), on `clock` if given."""
    kw: dict[str, Any] = {"clock": clock, **options} if clock else options
    if url.startswith("sqlite://"):
        return SQLiteStore(url.removeprefix("sqlite://"), **kw)
    from jobfleet.store.postgres import PostgresStore

    return PostgresStore(url, **kw)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store of each backend: a SQLite file, or a database of its own."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'store.db'}"
        return
    with fresh_database(require_server()) as url:
        yield url


class StoreFactory:
    """Opens stores on one empty store (each with its own connection), closed at teardown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = "sqlite" if url.startswith("sqlite://") else "postgres"
        self.opened: list[Store] = []

    def __call__(self, clock: Clock, **options: Any) -> Store:
        s = open_at(self.url, clock, **options)
        self.opened.append(s)
        return s


@pytest.fixture
def make_store(store_url: str) -> Iterator[StoreFactory]:
    factory = StoreFactory(store_url)
    yield factory
    for s in factory.opened:
        s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(make_store: StoreFactory, clock: Clock) -> Store:
    return make_store(clock)


def submit(store: Store, *jobs: JobSpec) -> str:
    return store.submit(NewRun(source="test"), jobs or [job()])


# -- submission ------------------------------------------------------------------------------

def test_submit_stores_every_job_queued_in_order(store: Store) -> None:
    run_id = submit(store, *(job(f"echo {i}", name=f"n{i}") for i in range(5)))
    jobs = store.jobs(run_id)
    assert [j.name for j in jobs] == [f"n{i}" for i in range(5)]
    assert {j.state for j in jobs} == {"queued"}
    assert store.counts(run_id)["queued"] == 5
    assert store.run(run_id).total == 5


def test_big_submissions_and_appends_keep_every_job_its_number_spec_and_payload(
        store: Store) -> None:
    # more jobs than one insert statement holds, and a part statement after them
    specs = [job(f"echo {i}", name=f"n{i}", cpus=1 + i % 3, max_attempts=1 + i % 4,
                 retry_on=(i % 5,) if i % 2 else ()) for i in range(1, 351)]
    payloads = [f"p{i}".encode() for i in range(1, 351)]
    run_id = store.submit(NewRun(source="test"), specs[:230], payloads[:230])
    assert store.append(run_id, specs[230:], payloads[230:]) == 231
    assert store.run(run_id).total == 350 and store.counts(run_id)["queued"] == 350
    stored = store.jobs(run_id)
    assert [j.seq for j in stored] == list(range(1, 351))
    assert [j.spec for j in stored] == specs
    got = store.lease("w", Capacity(350, 1000.0, 0), 60.0)
    assert sorted((le.seq, le.payload) for le in got) == list(enumerate(payloads, 1))


def test_submit_is_all_or_nothing(store: Store) -> None:
    def jobs() -> Iterator[JobSpec]:
        yield job("echo 1")
        yield job("echo 2")
        raise ValueError("the file broke half way")

    with pytest.raises(ValueError):
        store.submit(NewRun(), jobs())
    assert store.runs() == []


def test_empty_submission_is_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        store.submit(NewRun(), [])
    assert store.runs() == []


# -- leasing ----------------------------------------------------------------------------------

def test_lease_hands_each_job_to_one_worker(store: Store) -> None:
    run_id = submit(store, *(job() for _ in range(5)))
    a = store.lease("a", Capacity(3, 3, 10**9), 60)
    b = store.lease("b", Capacity(3, 3, 10**9), 60)
    assert len(a) == 3 and len(b) == 2
    assert not {x.key for x in a} & {x.key for x in b}
    assert store.lease("c", BIG, 60) == []
    assert store.counts(run_id)["running"] == 5


def test_lease_respects_resources(store: Store) -> None:
    submit(store, job(cpus=4), job(memory="2GiB"), job(gpus=1), job())
    got = store.lease("w", Capacity(slots=10, cpus=2, memory=2**30, gpus=0), 60)
    assert [x.spec.cpus for x in got] == [1.0]  # only the small job fits
    got = store.lease("w2", Capacity(slots=10, cpus=8, memory=4 * 2**30, gpus=1), 60)
    assert len(got) == 3


def test_lease_sums_resources_of_the_jobs_it_takes(store: Store) -> None:
    submit(store, job(cpus=2), job(cpus=2), job(cpus=2))
    assert len(store.lease("w", Capacity(slots=10, cpus=5, memory=10**9), 60)) == 2


def test_lease_ahead_takes_more_jobs_each_fitting_alone(store: Store) -> None:
    """A worker of short jobs leases some ahead: they need not fit together, only each alone."""
    submit(store, job(cpus=2), job(cpus=2), job(cpus=2), job(cpus=4), job(cpus=2), job(cpus=2))
    got = store.lease("w", Capacity(slots=2, cpus=2, memory=10**9), 60,
                      ahead=Capacity(slots=3, cpus=2, memory=10**9))
    # one job fits the free capacity; three more are held ahead, skipping the one too big
    assert [x.seq for x in got] == [1, 2, 3, 5]
    nothing_free = Capacity(slots=0, cpus=0, memory=0)
    assert [x.seq for x in store.lease("w", nothing_free, 60,
                                       ahead=Capacity(1, 8, 10**9))] == [4]


def test_an_attempt_records_when_it_really_started(store: Store, clock: Clock) -> None:
    """A job held ahead starts after its lease; its attempt shows the real start."""
    run_id = submit(store, job(), job(max_attempts=2))
    a, b = store.lease("w", BIG, 60)
    clock.advance(5)
    store.finish("w", [Outcome(a.key, a.token, "succeeded", exit_code=0,
                               started_at=clock.now - 1),
                       Outcome(b.key, b.token, "failed", exit_code=1, started_at=clock.now - 2)])
    [first] = store.attempts(a.key)
    [second] = store.attempts(b.key)
    assert (first.started_at, second.started_at) == (clock.now - 1, clock.now - 2)
    assert store.job(f"{run_id}-1").started_at == clock.now - 1


def test_a_job_handed_back_unstarted_leaves_no_attempt(store: Store) -> None:
    run_id = submit(store, job(max_attempts=1), job())
    a, b = store.lease("w", BIG, 60)
    store.cancel(run_id, b.key)  # asked while b was held
    assert store.finish("w", [Outcome(a.key, a.token, UNSTARTED),
                              Outcome(b.key, b.token, UNSTARTED)]) == []
    first, second = store.jobs(run_id)
    assert (first.state, first.attempts, store.attempts(a.key)) == ("queued", 0, [])
    assert (second.state, second.attempts, second.reason) == ("cancelled", 0, "cancelled by user")
    # the job's one attempt is still there to use
    (again,) = store.lease("w", BIG, 60)
    assert (again.key, again.attempt) == (a.key, 1)
    assert store.finish("w", [Outcome(a.key, a.token, UNSTARTED)]) == [a.key]  # stale token


def test_a_repeated_sandbox_error_does_not_use_up_attempts(store: Store, clock: Clock) -> None:
    """The sandbox failing again says nothing new about the job: only the first sandbox error
    counts against max_attempts (up to a limit, so a broken machine cannot retry for ever)."""
    run_id = submit(store, job(max_attempts=2, retry_delay=0))

    def attempt(reason: str) -> str:
        (x,) = store.lease("w", BIG, 60)
        store.finish("w", [Outcome(x.key, x.token, "failed", reason=reason)])
        return store.jobs(run_id)[0].state

    assert attempt("sandbox error: bwrap: cannot mount") == "queued"  # counted: 1 of 2
    assert attempt("sandbox error: bwrap: cannot mount") == "queued"  # not counted
    assert attempt("sandbox error: bwrap: cannot mount") == "queued"  # not counted
    assert attempt("exit code 1") == "failed"  # counted: 2 of 2
    [j] = store.jobs(run_id)
    assert j.attempts == 4


def test_lease_can_be_limited_to_one_run(store: Store) -> None:
    first = submit(store, job())
    second = submit(store, job())
    got = store.lease("w", BIG, 60, run_id=second)
    assert [x.run_id for x in got] == [second]
    assert store.counts(first)["queued"] == 1


def test_concurrent_workers_never_share_a_job(store_url: str) -> None:
    """Four processes race for 400 jobs; every job is leased exactly once."""
    s = open_at(store_url)
    run_id = s.submit(NewRun(), [job() for _ in range(400)])
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_race, [(store_url, f"w{i}") for i in range(4)])
    keys = [k for r in results for k in r]
    assert len(keys) == 400 and len(set(keys)) == 400
    assert s.counts(run_id)["succeeded"] == 400
    s.close()


def _race(args: tuple[str, str]) -> list[int]:
    url, name = args
    s = open_at(url)
    taken: list[int] = []
    while leases := s.lease(name, Capacity(3, 3, 10**9), 60):
        taken += [x.key for x in leases]
        assert s.finish(name, [Outcome(x.key, x.token, "succeeded", exit_code=0)
                               for x in leases]) == []
    s.close()
    return taken


# -- fencing and heartbeats -------------------------------------------------------------------

def test_a_stale_token_cannot_record_a_result(store: Store, clock: Clock) -> None:
    run_id = submit(store, job(max_attempts=3, retry_delay=0))
    (first,) = store.lease("a", BIG, 10)
    clock.advance(11)
    assert store.reap() == 1
    (second,) = store.lease("b", BIG, 10)
    assert second.attempt == 2 and second.token != first.token
    # the first worker comes back and reports: rejected, nothing recorded
    assert store.finish("a", [Outcome(first.key, first.token, "failed", exit_code=1)]) == [first.key]
    assert store.job(f"{run_id}-1").state == "running"
    assert store.finish("b", [Outcome(second.key, second.token, "succeeded", exit_code=0)]) == []
    assert store.job(f"{run_id}-1").state == "succeeded"
    # and nothing may overwrite a finished job
    assert store.finish("b", [Outcome(second.key, second.token, "failed")]) == [second.key]


def test_heartbeat_extends_the_lease(store: Store, clock: Clock) -> None:
    run_id = submit(store)
    (x,) = store.lease("a", BIG, 10)
    for _ in range(5):
        clock.advance(8)
        assert store.heartbeat("a", [(x.key, x.token)], 10).lost == frozenset()
        assert store.reap() == 0
    assert store.job(f"{run_id}-1").state == "running"


def test_heartbeat_with_a_stale_token_reports_the_lease_lost(store: Store, clock: Clock) -> None:
    submit(store, job(retry_delay=0))
    (x,) = store.lease("a", BIG, 10)
    clock.advance(11)
    store.reap()
    store.lease("b", BIG, 10)
    beat = store.heartbeat("a", [(x.key, x.token)], 10)
    assert beat.lost == {x.key}


def test_a_stalled_job_is_marked_until_it_moves_or_is_leased_again(
        store: Store, clock: Clock) -> None:
    run_id = submit(store, job(retry_delay=0), job())
    a, b = store.lease("a", BIG, 10)
    clock.advance(100)
    assert store.mark_stalled("a", a.key, a.token, 60)
    stalled = store.job(f"{run_id}-1")
    assert stalled.stalled_since == clock() - 60
    assert [j.seq for j in store.jobs(run_id, STALLED)] == [1]
    assert store.job(f"{run_id}-2").stalled_since is None
    kinds = [(e.kind, e.detail) for e in store.events(run_id, a.key)]
    assert ("stalled", {"quiet_for": 60}) in kinds
    assert store.mark_stalled("a", a.key, a.token, None)  # it printed again
    assert store.jobs(run_id, STALLED) == []
    assert store.events(run_id, a.key)[-1].kind == "progressing"
    assert store.mark_stalled("a", a.key, a.token, 70)
    store.heartbeat("a", [(b.key, b.token)], 10)
    clock.advance(11)
    store.reap()  # a's lease expired: the next attempt starts unstalled
    (again,) = store.lease("b", BIG, 10)
    assert again.key == a.key and store.job(f"{run_id}-1").stalled_since is None
    assert not store.mark_stalled("a", a.key, a.token, 80)  # a stale token changes nothing
    assert store.job(f"{run_id}-1").stalled_since is None


def test_usage_adds_up_by_instance_type_and_a_run_can_be_stopped(store: Store) -> None:
    run_id = submit(store)
    assert store.usage(run_id) == []
    store.add_usage(run_id, "m5.large", 30.0, 0.5)
    store.add_usage(run_id, "m5.large", 90.0, 1.5)
    store.add_usage(run_id, "local", 10.0, 0.0)
    assert [(u.instance_type, u.worker_seconds, u.cost) for u in store.usage(run_id)] == [
        ("local", 10.0, 0.0), ("m5.large", 120.0, 2.0)]
    assert store.run(run_id).stopped is None
    store.stop_run(run_id, "budget")
    assert store.run(run_id).stopped == "budget"
    assert store.job(f"{run_id}-1").state == "queued"  # its jobs wait for a resume
    store.stop_run(run_id, None)
    assert store.run(run_id).stopped is None
    assert [e.kind for e in store.events(run_id)][-2:] == ["run_stopped", "run_resumed"]


def test_a_finish_racing_a_reap_is_recorded_once(make_store: StoreFactory, clock: Clock) -> None:
    """A worker reports just as another process reaps its expired lease: one of them wins, and
    the job has one attempt, whichever it was."""
    worker, reaper = make_store(clock), make_store(clock)
    run_id = submit(worker, *(job(retry_delay=0) for _ in range(20)))
    leases = worker.lease("w", BIG, 10)
    clock.advance(11)
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def finish() -> None:
        start.wait()
        results["stale"] = worker.finish("w", [Outcome(x.key, x.token, "succeeded", exit_code=0)
                                               for x in leases])

    def reap() -> None:
        start.wait()
        results["reaped"] = reaper.reap()

    threads = [threading.Thread(target=finish), threading.Thread(target=reap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results["stale"]) == results["reaped"]
    counts = worker.counts(run_id)
    assert (counts["succeeded"], counts["queued"]) == (20 - results["reaped"], results["reaped"])
    assert all(len(worker.attempts(x.key)) == 1 for x in leases)


# -- expiry, retries, dead letters -----------------------------------------------------------

def test_expired_lease_requeues_and_counts_an_attempt(store: Store, clock: Clock) -> None:
    run_id = submit(store, job(max_attempts=2, retry_delay=0))
    store.lease("a", BIG, 5)
    clock.advance(6)
    assert store.reap() == 1
    j = store.job(f"{run_id}-1")
    assert (j.state, j.attempts) == ("queued", 1)
    assert "lease expired" in (j.reason or "")
    store.lease("b", BIG, 5)
    clock.advance(6)
    store.reap()
    j = store.job(f"{run_id}-1")
    assert (j.state, j.attempts) == ("failed", 2)  # budget spent: dead-lettered
    assert [a.state for a in store.attempts(j.key)] == ["lost", "lost"]


def test_failure_retries_with_growing_backoff_then_dead_letters(store: Store, clock: Clock) -> None:
    run_id = submit(store, job(max_attempts=3, retry_delay=10))
    waits = []
    for _ in range(3):
        (x,) = store.lease("w", BIG, 60)
        store.finish("w", [Outcome(x.key, x.token, "failed", exit_code=1)])
        j = store.job(f"{run_id}-1")
        if j.state == "queued":
            waits.append(j.not_before - clock.now)
            assert store.lease("w", BIG, 60) == []  # not before the backoff ends
            clock.advance(j.not_before - clock.now)
    assert store.job(f"{run_id}-1").state == "failed"
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 20  # doubling, jittered within [½, 1]


def test_retry_on_limits_which_exit_codes_are_retried(store: Store) -> None:
    run_id = submit(store, job(retry_on="75", max_attempts=5, retry_delay=0),
                    job(retry_on="75", max_attempts=5, retry_delay=0))
    a, b = store.lease("w", BIG, 60)
    store.finish("w", [Outcome(a.key, a.token, "failed", exit_code=75),
                       Outcome(b.key, b.token, "failed", exit_code=1)])
    assert store.job(f"{run_id}-1").state == "queued"
    assert store.job(f"{run_id}-2").state == "failed"


def test_retry_requeues_failed_jobs_with_a_fresh_budget(store: Store) -> None:
    run_id = submit(store, job(max_attempts=1), job(max_attempts=1))
    a, b = store.lease("w", BIG, 60)
    store.finish("w", [Outcome(a.key, a.token, "failed", exit_code=1),
                       Outcome(b.key, b.token, "succeeded", exit_code=0)])
    assert store.retry(run_id) == 1
    (again,) = store.lease("w", BIG, 60)
    assert (again.key, again.attempt) == (a.key, 2)
    store.finish("w", [Outcome(again.key, again.token, "failed", exit_code=1)])
    assert store.job(f"{run_id}-1").state == "failed"  # one fresh attempt, spent
    assert store.job(f"{run_id}-2").attempts == 1


def test_released_jobs_go_back_without_using_an_attempt(store: Store) -> None:
    run_id = submit(store, job(max_attempts=1))
    (x,) = store.lease("w", BIG, 60)
    store.finish("w", [Outcome(x.key, x.token, "released")])
    (y,) = store.lease("w", BIG, 60)
    store.finish("w", [Outcome(y.key, y.token, "failed", exit_code=1)])
    j = store.job(f"{run_id}-1")
    assert (j.state, j.attempts) == ("failed", 2)


def test_dead_worker_is_forgotten_at_once(store: Store) -> None:
    run_id = submit(store, job(retry_delay=0), job(retry_delay=0))
    store.lease("dead", BIG, 3600)
    assert store.forget_worker("dead", "worker dead died") == 2
    assert store.counts(run_id)["queued"] == 2


# -- cancel, skip ----------------------------------------------------------------------------

def test_cancel_stops_queued_now_and_asks_workers_for_running(store: Store) -> None:
    run_id = submit(store, job(), job(), job())
    (x,) = store.lease("w", Capacity(1, 1, 10**9), 60)
    assert store.cancel(run_id) == (2, 1)
    assert store.heartbeat("w", [(x.key, x.token)], 60).cancel == {x.key}
    store.finish("w", [Outcome(x.key, x.token, "cancelled")])
    assert store.counts(run_id)["cancelled"] == 3


def test_a_failure_after_cancel_is_not_retried(store: Store) -> None:
    run_id = submit(store, job(max_attempts=5))
    (x,) = store.lease("w", BIG, 60)
    store.cancel(run_id)
    store.finish("w", [Outcome(x.key, x.token, "failed", signal=15)])
    assert store.job(f"{run_id}-1").state == "cancelled"


def test_skipped_is_terminal(store: Store) -> None:
    run_id = submit(store)
    (x,) = store.lease("w", BIG, 60)
    store.finish("w", [Outcome(x.key, x.token, "skipped")])
    assert store.counts(run_id)["skipped"] == 1
    assert store.pending(run_id) == 0


# -- names and events ------------------------------------------------------------------------

def test_runs_and_jobs_are_found_by_unique_prefix(store: Store) -> None:
    run_id = submit(store, job(), job())
    assert store.run(run_id[:3]).id == run_id
    assert store.job(f"{run_id[:3]}-2").seq == 2
    assert store.run("latest").id == run_id
    with pytest.raises(NotFound, match="no job 3"):
        store.job(f"{run_id}-3")
    with pytest.raises(NotFound):
        store.run("zz")


def test_events_tell_the_story_of_a_job(store: Store, clock: Clock) -> None:
    run_id = submit(store, job(max_attempts=2, retry_delay=0))
    (x,) = store.lease("a", BIG, 5)
    clock.advance(6)
    store.reap()
    (y,) = store.lease("b", BIG, 5)
    clock.advance(1)
    store.finish("b", [Outcome(y.key, y.token, "succeeded", exit_code=0)])
    kinds = [e.kind for e in store.events(job_key=x.key)]
    assert kinds == ["leased", "lease_expired", "leased", "succeeded"]
    assert [e.kind for e in store.events(run_id=run_id)][0] == "submitted"


# -- the SQLite file itself ------------------------------------------------------------------

def test_migrations_run_once_and_the_file_stays_consistent(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    a = SQLiteStore(path)
    b = SQLiteStore(path)
    latest = sqlfiles.migrations("sqlite")[-1][0]
    assert a.schema_version() == b.schema_version() == latest
    a.submit(NewRun(), [job()])
    a.close()
    b.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM schema_migrations").fetchone() == (latest,)


def test_a_store_from_an_older_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """A store written by the first release (schema 1) opens with its runs, then takes calls."""
    path = tmp_path / "old.db"
    [(version, script)] = sqlfiles.migrations("sqlite")[:1]
    with sqlite3.connect(path) as db:
        db.executescript(script)
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
        db.execute("INSERT INTO runs (id, created_at, total) VALUES ('0ld00001', 0, 0)")
    store = SQLiteStore(path)
    assert store.schema_version() == sqlfiles.migrations("sqlite")[-1][0] > version
    assert [r.id for r in store.runs()] == ["0ld00001"]
    run_id = store.submit(NewRun(), [job()], [b"payload"])
    [lease] = store.lease("w", Capacity(1, 1, 2**30), 60, run_id)
    assert lease.payload == b"payload"
    store.close()


# -- many processes at once, waking, reconnecting ---------------------------------------------

def test_migrations_run_once_when_many_processes_open_a_store_at_once(store_url: str) -> None:
    """Eight processes open the same empty store at the same moment: one applies the schema."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(8)
    versions = ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(store_url, start, versions))
             for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    latest = sqlfiles.migrations("sqlite" if store_url.startswith("sqlite:") else "postgres")[-1][0]
    assert sorted(versions.get(timeout=10) for _ in procs) == [latest] * 8
    assert _migration_rows(store_url) == list(range(1, latest + 1))


def _open_at_once(url: str, start: Any, versions: Any) -> None:
    start.wait(timeout=60)
    s = open_at(url)
    versions.put(s.schema_version())  # type: ignore[attr-defined]
    s.close()


def _migration_rows(url: str) -> list[int]:
    """The versions the store recorded as applied, one row each."""
    sql = "SELECT version FROM schema_migrations ORDER BY version"
    if url.startswith("sqlite://"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as db:
            return [v for (v,) in db.execute(sql)]
    import psycopg

    with psycopg.connect(url) as db:
        return [v for (v,) in db.execute(sql)]


def _in_a_moment(action: Callable[[], object]) -> tuple[threading.Thread, dict[str, float]]:
    """Run `action` in a thread 0.2 s from now; the dict gets when it began and returned."""
    times: dict[str, float] = {}

    def run() -> None:
        time.sleep(0.2)  # a schedule, not a wait for state: the waiter must be blocked by then
        times["began"] = time.monotonic()
        action()
        times["done"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, times


def _blocks(store: Store, seconds: float = 0.05) -> bool:
    """Whether `wait_for_work` waits (nothing pending, and listening) rather than returning."""
    started = time.monotonic()
    store.wait_for_work(seconds)
    return time.monotonic() - started >= seconds * 0.8


def test_wait_for_work_wakes_when_work_comes_from_elsewhere(
        make_store: StoreFactory, clock: Clock) -> None:
    """A submit, an append, a retry or a job going back to the queue, from another process,
    wakes a waiting worker within 100 ms."""
    waiter, other = make_store(clock), make_store(clock)
    assert waiter.hears_work
    run_id = submit(other, job(max_attempts=1))
    (x,) = other.lease("w", BIG, 60)
    other.finish("w", [Outcome(x.key, x.token, "failed", exit_code=1)])

    def release() -> None:
        (y,) = other.lease("w", Capacity(1, 1, 10**9), 60)
        other.finish("w", [Outcome(y.key, y.token, "released")])

    for name, action in [("submit", lambda: submit(other)),
                         ("append", lambda: other.append(run_id, [job()])),
                         ("retry", lambda: other.retry(run_id)),
                         ("release", release)]:
        # read what came before, so that the next wake is news
        wait_for(lambda: _blocks(waiter), 5, what="the waiter to listen, nothing pending")
        thread, times = _in_a_moment(action)
        waiter.wait_for_work(10)
        woke = time.monotonic()
        thread.join()
        assert woke - times["done"] < 0.1, f"{name}: woke {woke - times['done']:.3f} s after it"
        assert woke >= times["began"], f"{name}: woke before anything happened"


def test_wait_for_work_waits_out_its_timeout_when_nothing_comes(
        make_store: StoreFactory, clock: Clock) -> None:
    waiter = make_store(clock)
    waiter.wait_for_work(0)  # starts listening
    started = time.monotonic()
    waiter.wait_for_work(0.3)
    assert 0.29 <= time.monotonic() - started < 2


class _CommitAnswerLost:
    """Stands in for a store's connection: the next COMMIT goes through, but its answer is lost
    with the connection (as when the server or the network goes down at that moment)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        import psycopg

        with self.real.transaction() as tx:
            yield tx
        self.real.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")


def _lose_the_next_commit_answer(store: Store) -> None:
    db = store._db  # type: ignore[attr-defined]
    db._conn = _CommitAnswerLost(db._connection())


def test_an_operation_whose_commit_answer_was_lost_is_recorded_once(
        make_store: StoreFactory, clock: Clock) -> None:
    """Retried after a lost answer to COMMIT, submit, append, lease and finish find what they
    did and do not do it again."""
    if make_store.backend == "sqlite":
        pytest.skip("SQLite commits in this process: no answer can be lost")
    store = make_store(clock, retry_for=10)
    _lose_the_next_commit_answer(store)
    run_id = submit(store, job(), job())
    assert [r.id for r in store.runs()] == [run_id] and store.run(run_id).total == 2
    _lose_the_next_commit_answer(store)
    assert store.append(run_id, [job(), job()]) == 3
    assert store.run(run_id).total == 4
    _lose_the_next_commit_answer(store)
    leases = store.lease("w", Capacity(3, 3, 10**9), 60)
    assert [x.seq for x in leases] == [1, 2, 3] and store.counts(run_id)["running"] == 3
    _lose_the_next_commit_answer(store)
    done = [Outcome(x.key, x.token, "succeeded", exit_code=0) for x in leases[:2]]
    assert store.finish("w", [*done, Outcome(leases[2].key, leases[2].token, "failed")]) == []
    assert [len(store.attempts(x.key)) for x in leases] == [1, 1, 1]
    assert store.counts(run_id)["succeeded"] == 2
    _lose_the_next_commit_answer(store)
    stale, more = store.exchange("w", [], BIG, 60)
    assert stale == [] and [x.seq for x in more] == [4]  # 3 waits out its backoff


def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(StoreError) as e:
        open_store(url)
    text = str(e.value)
    assert "s3cret" not in text and e.value.hint
    assert f"postgresql://someone:***@127.0.0.1:{url.split(':')[3]}" in text
    assert "running and reachable" in text


def test_store_urls_are_printed_without_their_password() -> None:
    from jobfleet.store.urls import conninfo, masked

    assert masked("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert masked("postgres://h/db?password=x&sslmode=require") == (
        "postgres://h/db?password=***&sslmode=require")
    assert masked("postgresql://u@h/db") == "postgresql://u@h/db"
    # a printed URL can be passed on: the password then comes from PGPASSWORD or ~/.pgpass
    assert conninfo("postgresql://u:***@h:5432/db") == "postgresql://u@h:5432/db"
    assert conninfo("postgresql://u:p@h/db") == "postgresql://u:p@h/db"


def test_the_sqlite_store_does_not_import_psycopg(tmp_path: Path) -> None:
    code = ("import sys; from jobfleet.store import open_store; import jobfleet.cli;"
            f" open_store({str(tmp_path / 'a.db')!r}).close();"
            " assert 'psycopg' not in sys.modules, 'psycopg imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A PostgreSQL server of this test's own, started."""
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.destroy()


def test_a_server_restart_is_ridden_out(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The server restarts under a worker: its operations retry on a new connection and succeed,
    and an outcome sent while the server was down is recorded exactly once."""
    from jobfleet.store.postgres import PostgresStore

    store = PostgresStore(cluster.url, retry_for=60)
    run_id = submit(store, job(), job(), job())
    a, b, c = store.lease("w", BIG, 600)
    store.wait_for_work(0)  # listening
    cluster.restart()
    assert store.finish("w", [Outcome(a.key, a.token, "succeeded", exit_code=0)]) == []
    caplog.clear()
    cluster.stop()
    sent: list[list[int]] = []
    finishing = threading.Thread(target=lambda: sent.append(store.finish(
        "w", [Outcome(b.key, b.token, "succeeded", exit_code=0)])))
    finishing.start()
    wait_for(lambda: any("retrying" in r.getMessage() for r in caplog.records), 30,
             what="the finish to find the server gone")
    cluster.start()
    finishing.join(timeout=60)
    assert sent == [[]]
    assert [x.state for x in store.attempts(b.key)] == ["succeeded"]
    assert [e.kind for e in store.events(job_key=b.key)] == ["leased", "succeeded"]
    assert store.counts(run_id)["succeeded"] == 2
    # the listener comes back too: it listens again, then hears of new work
    wait_for(lambda: _blocks(store), 10, what="the store to listen again")
    other = PostgresStore(cluster.url)
    thread, times = _in_a_moment(lambda: submit(other))
    store.wait_for_work(10)
    woke = time.monotonic()
    thread.join()
    assert times["began"] <= woke < times["done"] + 0.1
    other.close()
    store.close()


def test_a_store_gives_up_with_a_clear_error_when_the_server_stays_away(
        cluster: Cluster) -> None:
    from jobfleet.store.postgres import PostgresStore

    store = PostgresStore(cluster.url, retry_for=1)
    cluster.stop()
    started = time.monotonic()
    with pytest.raises(StoreError, match="lost the connection to the store") as e:
        store.runs()
    assert time.monotonic() - started < 5 and e.value.hint
    store.close()
