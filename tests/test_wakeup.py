"""An idle worker starts new work the moment it is submitted, not at its next poll (which, idle,
is up to 2 s away): SQLite wakes it through inotify, PostgreSQL through LISTEN/NOTIFY."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for
from jobfleet.spec import make_job
from jobfleet.store import NewRun, open_store
from pg import fresh_database, require_server


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "wake.db")
        return
    with fresh_database(require_server()) as url:
        yield url


def test_an_idle_worker_starts_a_submitted_job_at_once(jf: Jobfleet, store_url: str) -> None:
    worker = jf.popen("worker", "--store", store_url, "--slots", "1")
    with open_store(store_url) as db:
        wait_for(lambda: [w for w in db.workers() if w.state == "running"], 15,
                 what="the worker to register")
        delays = []
        for _ in range(5):
            time.sleep(2.5)  # long enough for the idle worker's polls to space out fully
            submitted = time.time()
            run = db.submit(NewRun(source="test"), [make_job("true", {}, {}, {})])
            [job] = wait_for(lambda run=run: [j for j in db.jobs(run) if j.state == "succeeded"],
                             10, interval=0.01, what="the job to run")
            assert job.started_at is not None
            delays.append(job.started_at - submitted)
    worker.terminate()
    assert worker.wait(15) == 0
    # polling alone would give about a second on average
    assert statistics.median(delays) < 0.1, delays
