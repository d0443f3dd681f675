"""Acceptance tests of worker processes under real signals: kill -9, timeouts, drain, cancel."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import Jobfleet, pids_with, wait_for, write_csv

# --- 4. a worker killed with SIGKILL loses nothing -----------------------------------------


def test_sigkilled_worker_loses_nothing(jf: Jobfleet, tmp_path: Path) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "n", "retry_delay"],
              [["echo start {n}; sleep 0.3; echo done {n}", n, 0] for n in range(1, 41)])
    run = jf.submit("jobs.csv")
    first = jf.popen("worker", "--slots", "4", "--lease-seconds", "2")
    with jf.open_store() as db:
        def under_way() -> bool:
            c = db.counts(run)
            return c["succeeded"] >= 4 and c["running"] >= 1
        wait_for(under_way, 20, what="some jobs done and some running")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)

        at_kill = jf.jobs(run)
        was_running = {j for j, v in at_kill.items() if v["state"] == "running"}
        done_before = {j for j, v in at_kill.items() if v["state"] == "succeeded"}
        assert was_running and done_before
        # the orphaned `sleep 0.3`s of the killed worker run in their own sessions and end alone

        second = jf.popen("worker", "--idle-exit", "3", "--lease-seconds", "2")
        assert second.wait(40) == 0, second.communicate()

        final = jf.jobs(run)
        assert len(final) == 40
        assert {v["state"] for v in final.values()} == {"succeeded"}
        for job, v in final.items():
            seq = v["seq"]
            assert v["attempts"] == (2 if job in was_running else 1), (job, v)
            assert f"done {seq}" in jf.log(run, seq, v["attempts"])
            if job not in was_running:
                continue
            assert f"start {seq}" in jf.log(run, seq, 1), "the first attempt's log is gone"
            first_try, second_try = db.attempts(db.job(job).key)
            assert first_try.state == "lost" and second_try.state == "succeeded"
            # the lease (2s from the start of the attempt, or later) had expired
            assert second_try.started_at > first_try.started_at + 2.0, (first_try, second_try)
    assert jf.json("status", run)["counts"]["succeeded"] == 40
    killed = [w for w in jf.json("workers") if w["pid"] == first.pid]
    assert [w["state"] for w in killed] == ["silent"]


# --- 5. timeouts kill the whole process group ----------------------------------------------


def test_timeout_kills_the_whole_process_group(jf: Jobfleet, tmp_path: Path, marker: str) -> None:
    # the leader, a child, and a subshell child that ignores TERM (only KILL ends it)
    command = f"echo started; (trap '' TERM; sleep {marker}) & sleep {marker} & wait"
    write_csv(tmp_path / "jobs.csv", ["command", "timeout", "max_attempts"],
              [[command, "1s", 1]])
    runner = jf.popen("run", "jobs.csv")
    wait_for(lambda: len(pids_with(marker)) >= 3, 15, what="the job's processes")
    out, err = runner.communicate(timeout=30)
    assert runner.returncode == 1, (out, err)
    assert "timed out" in out
    [job] = jf.json("jobs", "latest")
    assert job["state"] == "failed" and "timed out after 1s" in job["reason"], job
    assert job["attempts"] == 1
    # KILL reaches the group at once; allow a moment for the kernel to deliver it
    wait_for(lambda: not pids_with(marker), 3, what="the job's processes to be gone")


def test_timeout_kills_a_job_that_ignores_term_after_the_grace(jf: Jobfleet, tmp_path: Path,
                                                               marker: str) -> None:
    command = f"trap 'echo got TERM' TERM; echo started {marker}; while :; do sleep 0.1; done"
    write_csv(tmp_path / "jobs.csv", ["command", "timeout", "max_attempts"],
              [[command, "1s", 1]])
    p = jf("run", "jobs.csv", env={"JOBFLEET_KILL_GRACE": "1"}, check=1, timeout=30)
    [job] = jf.json("jobs", "latest")
    assert job["state"] == "failed" and "timed out" in job["reason"], job
    assert job["signal"] == signal.SIGKILL
    assert "got TERM" in jf.log(job["run"], 1), "TERM was not sent before KILL"
    with jf.open_store() as db:
        [attempt] = db.attempts(db.job(job["job"]).key)
    took = attempt.finished_at - attempt.started_at
    assert 1.9 <= took < 4.5, f"killed after {took:.2f}s; timeout 1s + grace 1s"
    assert "got TERM" in p.stdout  # the failure's log excerpt
    wait_for(lambda: not pids_with(marker), 3, what="the job's processes to be gone")


# --- 6. SIGTERM drains; a second SIGTERM releases -----------------------------------------


def test_sigterm_drains_the_worker(jf: Jobfleet) -> None:
    run = jf.submit("--each", "echo started {}; sleep 1; echo finished {}", "a", "b", "c")
    worker = jf.popen("worker", "--slots", "1", "--lease-seconds", "2")
    wait_for(lambda: "started a" in jf.log(run, 1), 15, what="the first job to start")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=15)
    assert worker.returncode == 0, (out, err)

    jobs = jf.jobs(run)
    first = jobs[f"{run}-1"]
    assert (first["state"], first["attempts"]) == ("succeeded", 1)
    assert jf.log(run, 1) == "started a\nfinished a\n"
    for seq in (2, 3):  # no new jobs were taken
        assert (jobs[f"{run}-{seq}"]["state"], jobs[f"{run}-{seq}"]["attempts"]) == ("queued", 0)
    [w] = jf.json("workers")
    assert w["state"] == "stopped" and w["jobs_done"] == 1


def test_second_sigterm_releases_the_running_job(jf: Jobfleet, tmp_path: Path,
                                                 marker: str) -> None:
    command = f"if [ -e go ]; then echo second; else echo started; sleep {marker}; fi"
    write_csv(tmp_path / "jobs.csv", ["command", "max_attempts"], [[command, 1]])
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--slots", "1")
    wait_for(lambda: "started" in jf.log(run, 1), 15, what="the job to start")
    start = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    # signals of one kind do not queue: the second goes once the first is handled
    wait_until_draining(jf)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=15)
    assert worker.returncode == 0, (out, err)
    assert time.monotonic() - start < 5, "the second SIGTERM did not stop the worker at once"

    job = jf.jobs(run)[f"{run}-1"]
    assert job["state"] == "queued", job
    wait_for(lambda: not pids_with(marker), 3, what="the released job's processes to be gone")

    # max_attempts is 1: the released attempt did not use up the budget
    (tmp_path / "go").touch()
    jf("worker", "--idle-exit", "0.5", check=0)
    job = jf.jobs(run)[f"{run}-1"]
    assert job["state"] == "succeeded", job
    assert jf.log(run, 1, job["attempts"]) == "second\n"


def test_drain_hands_back_the_short_jobs_held_ahead(jf: Jobfleet, tmp_path: Path) -> None:
    """A worker of short jobs leases some ahead; drained, it returns them unstarted."""
    n = 3000
    write_csv(tmp_path / "jobs.csv", ["command"], [["true"]] * n)
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--slots", "2")
    with jf.open_store() as db:
        wait_for(lambda: db.counts(run)["succeeded"] >= 300, 30, interval=0.01,
                 what="300 jobs to succeed")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
        jobs = db.jobs(run)
        by_state = {state: [j for j in jobs if j.state == state] for state in ("succeeded", "queued")}
        assert len(by_state["succeeded"]) + len(by_state["queued"]) == n, db.counts(run)
        assert len(by_state["queued"]) > 0, "the worker ran everything before the SIGTERM"
        assert {j.attempts for j in by_state["succeeded"]} == {1}
        # held jobs went back as never leased: no attempt used, none recorded
        assert {j.attempts for j in by_state["queued"]} == {0}
        assert sum(len(db.attempts(j.key)) for j in jobs) == len(by_state["succeeded"])
        jf("worker", "--idle-exit", "0.5", check=0)
        assert db.counts(run)["succeeded"] == n
        assert {j.attempts for j in db.jobs(run)} == {1}


def test_draining_worker_shows_as_draining(jf: Jobfleet, tmp_path: Path) -> None:
    run = jf.submit("--each", "echo started; while [ ! -e {} ]; do sleep 0.05; done", "release")
    worker = jf.popen("worker", "--slots", "1", "--lease-seconds", "1")
    wait_for(lambda: "started" in jf.log(run, 1), 15, what="the job to start")
    assert [w["state"] for w in jf.json("workers")] == ["running"]
    worker.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: [w["state"] for w in jf.json("workers")] == ["draining"], 3,
                 what="`jobfleet workers` to show the worker draining")
    finally:
        (tmp_path / "release").touch()
        assert worker.wait(15) == 0


def test_released_job_is_not_counted_as_done(jf: Jobfleet, marker: str) -> None:
    run = jf.submit("--each", f"echo started {{}}; sleep {marker}", "x")
    worker = jf.popen("worker", "--slots", "1", "--lease-seconds", "1")
    wait_for(lambda: "started" in jf.log(run, 1), 15, what="the job to start")
    worker.send_signal(signal.SIGTERM)
    # signals of one kind do not queue: the second goes once the first is handled
    wait_until_draining(jf)
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=15)
    assert "1 released" in out
    assert jf.jobs(run)[f"{run}-1"]["state"] == "queued"
    [w] = jf.json("workers")
    assert w["jobs_done"] == 0, w


# --- 7. cancel ------------------------------------------------------------------------------


def test_cancel_run_kills_running_and_cancels_queued(jf: Jobfleet, tmp_path: Path,
                                                     marker: str) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "n"],
              [[f"echo started {{n}}; sleep {marker}", n] for n in range(1, 6)])
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--slots", "2", "--lease-seconds", "1", "--idle-exit", "1")
    wait_for(lambda: "started" in jf.log(run, 1) and "started" in jf.log(run, 2), 15,
             what="two jobs to start")

    p = jf("cancel", run, check=0)
    assert "cancelled 3 queued jobs" in p.stdout and "stop 2 running" in p.stdout, p.stdout
    jobs = jf.jobs(run)
    assert [jobs[f"{run}-{n}"]["state"] for n in (3, 4, 5)] == ["cancelled"] * 3
    assert all(jobs[f"{run}-{n}"]["attempts"] == 0 for n in (3, 4, 5))

    with jf.open_store() as db:
        wait_for(lambda: db.counts(run)["cancelled"] == 5, 5, what="running jobs to be cancelled")
    wait_for(lambda: not pids_with(marker), 3, what="the jobs' processes to be gone")
    status = jf.json("status", run)
    assert status["state"] == "cancelled" and status["counts"]["cancelled"] == 5
    for job in jf.json("jobs", run):
        assert "cancel" in (job["reason"] or ""), job
    assert worker.wait(15) == 0


def test_cancel_one_job(jf: Jobfleet, tmp_path: Path, marker: str) -> None:
    write_csv(tmp_path / "jobs.csv", ["command"],
              [[f"echo started; sleep {marker}"], [f"echo started; sleep {marker}"],
               ["echo survivor"]])
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--slots", "1", "--lease-seconds", "1", "--idle-exit", "1")
    wait_for(lambda: "started" in jf.log(run, 1), 15, what="the first job to start")

    p = jf("cancel", f"{run}-2", check=0)  # queued: cancelled at once
    assert "cancelled 1 queued job" in p.stdout, p.stdout
    jobs = jf.jobs(run)
    assert [jobs[f"{run}-{n}"]["state"] for n in (1, 2, 3)] == ["running", "cancelled", "queued"]

    jf("cancel", f"{run}-1", check=0)  # running: killed by its worker
    with jf.open_store() as db:
        wait_for(lambda: db.job(f"{run}-1").state == "cancelled", 5, what="job 1 cancelled")
    wait_for(lambda: not pids_with(marker), 3, what="job 1's processes to be gone")
    assert worker.wait(15) == 0
    jobs = jf.jobs(run)
    assert [jobs[f"{run}-{n}"]["state"] for n in (1, 2, 3)] == [
        "cancelled", "cancelled", "succeeded"]
    assert jf.json("status", run)["state"] == "finished"


def wait_until_draining(jf: Jobfleet) -> None:
    wait_for(lambda: [w["state"] for w in jf.json("workers")] == ["draining"], 5,
             what="the worker to record that it is draining")
