"""`jobfleet explain JOB` names the real reason a job is waiting or failed, with what to try."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import Jobfleet, wait_for, write_csv


def explain(jf: Jobfleet, job: str) -> str:
    return jf("explain", job, check=0).stdout


def test_no_worker_alive(jf: Jobfleet) -> None:
    run = jf.submit("--each", "true {}", "x")
    text = explain(jf, f"{run}-1")
    assert "queued" in text and "no worker is alive" in text
    assert f"jobfleet worker --run {run}" in text


def test_no_worker_large_enough_names_the_largest(jf: Jobfleet, tmp_path: Path) -> None:
    write_csv(tmp_path / "big.csv", ["command", "cpus"], [["true", 64]])
    run = jf.submit("big.csv")
    jf.popen("worker", "--slots", "2", "--cpus", "2")
    [w] = wait_for(lambda: [w for w in jf.json("workers") if w["state"] == "running"], 15,
                   what="the worker to register")
    text = explain(jf, f"{run}-1")
    assert "no alive worker is large enough" in text and "needs 64 cpus" in text
    assert f"{w['worker']} on" in text and "offers 2 cpus" in text


def test_backoff_says_until_when(jf: Jobfleet, tmp_path: Path) -> None:
    write_csv(tmp_path / "j.csv", ["command", "max_attempts", "retry_delay"],
              [["echo oops; exit 1", 3, "10m"]])
    run = jf.submit("j.csv")
    jf("worker", "--max-jobs", "1", check=0)
    text = explain(jf, f"{run}-1")
    assert "waiting out a retry backoff until" in text
    assert "attempt 1 failed: exit code 1" in text and "attempts used: 1 of 3" in text


def test_cancelled(jf: Jobfleet) -> None:
    run = jf.submit("--each", "true {}", "x")
    jf("cancel", run, check=0)
    text = explain(jf, f"{run}-1")
    assert "cancelled" in text and f"jobfleet retry {run}-1" in text


def test_timeout_with_the_log(jf: Jobfleet, tmp_path: Path) -> None:
    write_csv(tmp_path / "j.csv", ["command", "timeout", "max_attempts"],
              [["echo working; sleep 30", "0.5s", 1]])
    jf("run", "j.csv", check=1)
    text = explain(jf, "latest-1")
    assert "timed out after 0.5s" in text and "raise its `timeout`" in text
    assert "| working" in text


def test_exit_code_meaning(jf: Jobfleet) -> None:
    jf("run", "--each", "{}", "no-such-command-here", check=1)
    text = explain(jf, "latest-1")
    assert "exited with code 127" in text and "command was not found" in text


def test_worker_lost(jf: Jobfleet, tmp_path: Path, marker: str) -> None:
    write_csv(tmp_path / "j.csv", ["command", "max_attempts"], [[f"sleep {marker}", 1]])
    run = jf.submit("j.csv")
    worker = jf.popen("worker", "--lease-seconds", "1")
    wait_for(lambda: jf.jobs(run)[f"{run}-1"]["state"] == "running", 15, what="the job to start")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # silent: its last heartbeat is a lease length old, so the lease it renewed has run out
    wait_for(lambda: [w["state"] for w in jf.json("workers")] == ["silent"], 15,
             what="the killed worker's lease to run out")
    jf("worker", "--idle-exit", "0.5", check=0)  # another worker reaps it
    text = explain(jf, f"{run}-1")
    assert "failed" in text and "its worker was lost" in text
    assert "raise `max_attempts`" in text
