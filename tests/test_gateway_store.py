"""The store contract through the gateway: the contract tests of test_store.py (those a worker
or client can reach: leasing, fencing, heartbeats, outcomes, retries, cancels, waiting for
work) run again against a `GatewayStore` that speaks to a real server on 127.0.0.1, in front
of each backend. The server runs in a thread of the test so that it shares the test's clock.

What only an operator does on the store itself (reaping, forgetting a worker) goes to the
store directly, as it would on the server's machine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_server import AnswerLosingProxy, ThreadServer, make_token
from jobfleet.gateway.client import Session
from jobfleet.gateway.server import create_server
from jobfleet.gateway.store import GatewayStore
from jobfleet.store import Capacity, Outcome, Store
from test_store import (  # noqa: F401  (the tests and fixtures run here again)
    BIG,
    Clock,
    job,
    open_at,
    store_url,
    submit,
    test_a_failure_after_cancel_is_not_retried,
    test_a_finish_racing_a_reap_is_recorded_once,
    test_a_job_handed_back_unstarted_leaves_no_attempt,
    test_a_repeated_sandbox_error_does_not_use_up_attempts,
    test_a_stale_token_cannot_record_a_result,
    test_a_stalled_job_is_marked_until_it_moves_or_is_leased_again,
    test_an_attempt_records_when_it_really_started,
    test_cancel_stops_queued_now_and_asks_workers_for_running,
    test_dead_worker_is_forgotten_at_once,
    test_empty_submission_is_refused,
    test_events_tell_the_story_of_a_job,
    test_expired_lease_requeues_and_counts_an_attempt,
    test_failure_retries_with_growing_backoff_then_dead_letters,
    test_heartbeat_extends_the_lease,
    test_heartbeat_with_a_stale_token_reports_the_lease_lost,
    test_lease_ahead_takes_more_jobs_each_fitting_alone,
    test_lease_can_be_limited_to_one_run,
    test_lease_hands_each_job_to_one_worker,
    test_lease_respects_resources,
    test_lease_sums_resources_of_the_jobs_it_takes,
    test_released_jobs_go_back_without_using_an_attempt,
    test_retry_on_limits_which_exit_codes_are_retried,
    test_retry_requeues_failed_jobs_with_a_fresh_budget,
    test_runs_and_jobs_are_found_by_unique_prefix,
    test_skipped_is_terminal,
    test_submit_is_all_or_nothing,
    test_submit_stores_every_job_queued_in_order,
    test_wait_for_work_waits_out_its_timeout_when_nothing_comes,
    test_wait_for_work_wakes_when_work_comes_from_elsewhere,
)


class ThroughGateway(GatewayStore):
    """A GatewayStore (admin token) whose operator-only operations go to the store itself."""

    def __init__(self, session: Session, direct: Store) -> None:
        super().__init__(session)
        self.direct = direct

    def reap(self) -> int:
        return self.direct.reap()

    def forget_worker(self, worker_id: str, reason: str) -> int:
        return self.direct.forget_worker(worker_id, reason)

    def close(self) -> None:
        super().close()
        self.direct.close()


class GatewayFactory:
    """Opens gateway stores on one empty store, all through one server on the test's clock."""

    def __init__(self, url: str, blobs: Path) -> None:
        self.url, self.blobs = url, blobs
        self.backend = "gateway"
        self.server: ThreadServer | None = None
        self.opened: list[Store] = []
        self.token = ""

    def start(self, clock: Clock) -> ThreadServer:
        if self.server is None:
            app = create_server(self.url, str(self.blobs), opener=lambda u: open_at(u, clock),
                                dashboard=False)
            self.server = ThreadServer(app)
            self.token = make_token(_location(self.url), "admin")
        return self.server

    def __call__(self, clock: Clock, *, through: str | None = None, **options: Any) -> Store:
        server = self.start(clock)
        session = Session(through or server.url, self.token, retry_for=30)
        s = ThroughGateway(session, open_at(self.url, clock))
        self.opened.append(s)
        return s

    def close(self) -> None:
        for s in self.opened:
            s.close()
        if self.server is not None:
            self.server.stop()


def _location(url: str) -> str:
    return url.removeprefix("sqlite://")


@pytest.fixture
def make_store(store_url: str, tmp_path: Path) -> Iterator[GatewayFactory]:  # noqa: F811
    factory = GatewayFactory(store_url, tmp_path / "blobs")
    yield factory
    factory.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(make_store: GatewayFactory, clock: Clock) -> Store:
    return make_store(clock)


# -- what only the gateway adds ----------------------------------------------------------------

def test_concurrent_gateway_workers_never_share_a_job(make_store: GatewayFactory,
                                                      clock: Clock) -> None:
    """Four workers, each with its own connection to the server, race for 200 jobs."""
    first = make_store(clock)
    run_id = submit(first, *(job() for _ in range(200)))
    taken: dict[str, list[int]] = {}

    def race(name: str) -> None:
        s = make_store(clock)
        mine = taken.setdefault(name, [])
        while leases := s.lease(name, Capacity(3, 3, 10**9), 60):
            mine += [x.key for x in leases]
            assert s.finish(name, [Outcome(x.key, x.token, "succeeded", exit_code=0)
                                   for x in leases]) == []

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    keys = [k for ks in taken.values() for k in ks]
    assert len(keys) == 200 and len(set(keys)) == 200
    assert first.counts(run_id)["succeeded"] == 200


def test_a_request_whose_answer_was_lost_is_done_once(make_store: GatewayFactory,
                                                      clock: Clock) -> None:
    """A proxy drops the answers of submit, append, lease, finish and exchange after the
    server did the work: sent again, each finds what it did instead of doing it twice."""
    server = make_store.start(clock)
    proxy = AnswerLosingProxy(server.port)
    store = make_store(clock, through=proxy.url)
    direct = make_store(clock)
    try:
        proxy.lose_next_answer()
        run_id = submit(store, job(), job())
        assert [r.id for r in direct.runs()] == [run_id] and direct.run(run_id).total == 2
        proxy.lose_next_answer()
        assert store.append(run_id, [job(), job()]) == 3
        assert direct.run(run_id).total == 4
        proxy.lose_next_answer()
        leases = store.lease("w", Capacity(3, 3, 10**9), 60)
        assert [x.seq for x in leases] == [1, 2, 3] and direct.counts(run_id)["running"] == 3
        proxy.lose_next_answer()
        done = [Outcome(x.key, x.token, "succeeded", exit_code=0) for x in leases[:2]]
        assert store.finish("w", done) == []  # recorded by the first try, not called stale
        assert [len(direct.attempts(x.key)) for x in leases[:2]] == [1, 1]
        proxy.lose_next_answer()
        third = Outcome(leases[2].key, leases[2].token, "failed", exit_code=1)
        stale, more = store.exchange("w", [third], BIG, 60)
        assert stale == [] and [x.seq for x in more] == [4]  # 3 waits out its backoff
        assert [len(direct.attempts(x.key)) for x in leases] == [1, 1, 1]
        assert direct.counts(run_id)["running"] == 1
        assert proxy.lost == 5
    finally:
        proxy.close()
