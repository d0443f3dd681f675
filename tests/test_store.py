"""The store contract: queue semantics every store must keep, written once for all backends.

Each backend gets a fixture in `STORES`; the tests talk only to the `Store` interface, with an
injected clock so lease expiry and backoff are tested without waiting.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobfleet.errors import NotFound, StoreError
from jobfleet.spec import JobSpec, make_job
from jobfleet.store import UNSTARTED, Capacity, NewRun, Outcome, Store, sqlfiles
from jobfleet.store.sqlite import SQLiteStore

BIG = Capacity(slots=100, cpus=100, memory=10**12, gpus=8)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def job(command: str = "true", **fields: object) -> JobSpec:
    return make_job(command, fields, {}, {})


StoreFactory = Callable[[Clock], Store]


@pytest.fixture(params=["sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[Store] = []

    def factory(clock: Clock) -> Store:
        s = SQLiteStore(tmp_path / "store.db", clock=clock)
        opened.append(s)
        return s

    yield factory
    for s in opened:
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


def test_lease_can_be_limited_to_one_run(store: Store) -> None:
    first = submit(store, job())
    second = submit(store, job())
    got = store.lease("w", BIG, 60, run_id=second)
    assert [x.run_id for x in got] == [second]
    assert store.counts(first)["queued"] == 1


def test_concurrent_workers_never_share_a_job(tmp_path: Path) -> None:
    """Four processes race for 400 jobs; every job is leased exactly once."""
    path = tmp_path / "race.db"
    s = SQLiteStore(path)
    run_id = s.submit(NewRun(), [job() for _ in range(400)])
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_race, [(str(path), f"w{i}") for i in range(4)])
    keys = [k for r in results for k in r]
    assert len(keys) == 400 and len(set(keys)) == 400
    assert s.counts(run_id)["succeeded"] == 400
    s.close()


def _race(args: tuple[str, str]) -> list[int]:
    path, name = args
    s = SQLiteStore(path)
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
