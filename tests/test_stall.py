"""Stalled jobs: a running job with no output and no CPU use for its `stall_after` is shown as
stalled by `status`, `jobs`, `explain` and the dashboard's API, and with `on_stall=retry` it
is stopped and retried. Real jobs on a real worker: sleeping, computing and printing."""

from __future__ import annotations

import warnings
from pathlib import Path

from conftest import Jobfleet, wait_for, write_csv

with warnings.catch_warnings():  # newer Starlette would rather have httpx2 behind TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

BUSY = "python3 -c 'import time; t = time.time()\nwhile time.time() - t < 6: pass'"
CHATTY = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo tick $i; sleep 0.4; done"


def test_a_quiet_job_is_shown_stalled_and_busy_or_chatty_ones_are_not(
        jf: Jobfleet, tmp_path: Path) -> None:
    jobs = write_csv(tmp_path / "jobs.csv", ["name", "command", "stall_after"], [
        ["hung", "sleep 30", "1s"],
        ["busy", BUSY, "1s"],
        ["chatty", CHATTY, "1s"],
        ["patient", "sleep 30", "never"],
    ])
    jf.popen("run", str(jobs), "--slots", "4")
    run = wait_for(lambda: jf.json("runs"), 20, what="the run")[0]["run"]
    stalled = wait_for(lambda: jf.json("jobs", run, "--state", "stalled"), 15,
                       what="a stalled job")
    # the others have run past their stall_after by now, computing or printing
    wait_for(lambda: all(j["state"] == "running" for j in jf.jobs(run).values()), 10)
    assert [j["name"] for j in jf.json("jobs", run, "--state", "stalled")] == ["hung"]
    assert stalled[0]["stalled_since"] is not None
    status = jf("status", run, check=0).stdout
    assert "(1 stalled)" in status
    assert "stalled" in jf("jobs", run, check=0).stdout
    explained = jf("explain", f"{run}-1", check=0).stdout
    assert "stalled: no output and no CPU use" in explained and "on_stall" in explained
    assert "stalled" not in jf("explain", f"{run}-2", check=0).stdout
    events = [e["kind"] for e in jf.json("events", f"{run}-1")]
    assert "stalled" in events
    with dashboard(jf) as client:
        listed = client.get(f"/api/runs/{run}/jobs", params={"state": "stalled"}).json()
        assert [j["name"] for j in listed] == ["hung"]
        page = client.get(f"/runs/{run}").text
        assert 'data-testid="count-stalled">1<' in page
        assert 'badge s-stalled' in client.get(f"/jobs/{run}-1").text
        assert 'badge s-stalled' not in client.get(f"/jobs/{run}-2").text
    jf("cancel", run, check=0)


def dashboard(jf: Jobfleet) -> TestClient:
    from jobfleet.dashboard import create_app

    return TestClient(create_app(str(jf.store_path), str(jf.blobs), "token-0123456789abcdef"),
                      base_url="http://127.0.0.1:8765")


def test_on_stall_retry_stops_a_hung_job_and_tries_it_again(jf: Jobfleet, tmp_path: Path) -> None:
    jobs = write_csv(tmp_path / "jobs.csv",
                     ["command", "stall_after", "on_stall", "max_attempts", "retry_delay"],
                     [["echo start; sleep 60", "1s", "retry", "2", "0"]])
    p = jf("run", str(jobs), timeout=60, check=1)
    assert "stalled: no output and no CPU use for 1s after 2 attempts" in p.stdout
    run = jf.json("runs")[0]["run"]
    (job,) = jf.jobs(run).values()
    assert job["state"] == "failed" and job["attempts"] == 2
    assert jf.log(run, 1, 1).startswith("start") and jf.log(run, 1, 2).startswith("start")
    explained = jf("explain", f"{run}-1", check=0).stdout
    assert "its on_stall is retry" in explained
