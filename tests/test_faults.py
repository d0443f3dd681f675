"""Resource faults: a blob store that is full or read-only, and a PostgreSQL store that goes
away for a while. The worker keeps its jobs' state honest (an attempt whose log or outputs
could not be stored fails, saying why), does not crash, and goes on with the next job.

The full and read-only blob stores are tmpfs mounts of the test's own (root only: a skip
elsewhere, a failure in CI); the PostgreSQL server is a throwaway cluster, stopped and started.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for, write_csv
from pg import Cluster, require_server


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own, unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=1m,mode=0755", "jobfleet-test", str(where))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        reason = f"cannot mount a tmpfs here (root needed): {e}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def worker_output(jf: Jobfleet, *args: str) -> str:
    """Run a worker until it is idle; it must end by itself, without a traceback."""
    p = jf("worker", "--slots", "1", "--idle-exit", "1", *args, timeout=120)
    assert p.returncode == 0, f"the worker failed:\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p.stdout


def jobs_by_seq(jf: Jobfleet, run: str) -> dict[int, dict[str, object]]:
    return {j["seq"]: j for j in jf.json("jobs", run)}


FAULT_JOBS = [
    # declared outputs bigger than the whole blob store
    ["head -c 2000000 /dev/zero > big.out", "big.out", 1],
    # output (its log) bigger than the blob store
    ["yes 0123456789abcdef | head -c 3000000", "", 1],
    # prints nothing, stores nothing: it can succeed
    ["true", "", 1],
]


def test_a_full_blob_store_fails_the_jobs_it_cannot_store(jf: Jobfleet, tmpfs: Path) -> None:
    jf.env["JOBFLEET_BLOBS"] = str(tmpfs)
    write_csv(jf.cwd / "jobs.csv", ["command", "outputs", "max_attempts"], FAULT_JOBS)
    run = jf.submit("jobs.csv")
    worker_output(jf)
    jobs = jobs_by_seq(jf, run)
    assert [jobs[n]["state"] for n in (1, 2, 3)] == ["failed", "failed", "succeeded"], jobs
    for n in (1, 2):
        reason = str(jobs[n]["reason"])
        assert "No space left on device" in reason and str(tmpfs) in reason, (n, reason)
    assert "output" in str(jobs[1]["reason"]) and "log" in str(jobs[2]["reason"])
    # nothing half-stored claims to be an output
    assert not (tmpfs / "outputs" / run / "1" / "big.out").exists()
    assert not list(tmpfs.rglob("*.partial"))


def test_a_read_only_blob_store_fails_the_jobs_it_cannot_store(jf: Jobfleet, tmpfs: Path) -> None:
    _mount("-o", "remount,ro", str(tmpfs))
    jf.env["JOBFLEET_BLOBS"] = str(tmpfs)
    write_csv(jf.cwd / "jobs.csv", ["command", "outputs", "max_attempts"], [
        ["echo result > small.out", "small.out", 1],
        ["echo hello", "", 1],
        ["true", "", 1],
    ])
    run = jf.submit("jobs.csv")
    worker_output(jf)
    jobs = jobs_by_seq(jf, run)
    assert [jobs[n]["state"] for n in (1, 2, 3)] == ["failed", "failed", "succeeded"], jobs
    for n in (1, 2):
        assert "Read-only file system" in str(jobs[n]["reason"]), jobs[n]
    assert list(tmpfs.iterdir()) == []


def test_a_worker_waits_for_a_stopped_database_and_resumes(jf: Jobfleet, tmp_path: Path) -> None:
    require_server()
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        _outage(jf, cluster, tmp_path)
    finally:
        cluster.destroy()


def _outage(jf: Jobfleet, cluster: Cluster, tmp_path: Path) -> None:
    from jobfleet.store import open_store

    jf.env["JOBFLEET_STORE"] = cluster.url
    effects = tmp_path / "effects.log"
    n = 20
    write_csv(tmp_path / "jobs.csv", ["command", "n", "effects"],
              [["sleep 0.2; echo {n} >> {effects}; echo done {n}", i, str(effects)]
               for i in range(1, n + 1)])
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--slots", "2", "--lease-seconds", "30", "--idle-exit", "1")
    with open_store(cluster.url) as db:
        wait_for(lambda: db.counts(run)["succeeded"] >= 4, 60, what="some jobs to succeed")
    cluster.stop()
    stopped = time.monotonic()
    # the jobs running now end while the store is away; the worker holds on to their results
    while time.monotonic() - stopped < 10:
        assert worker.poll() is None, f"the worker gave up: {worker.communicate()}"
        time.sleep(0.2)
    lines_during = effects.read_text().count("\n")
    cluster.start()
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, (out, err)
    assert "Traceback" not in err, err
    with open_store(cluster.url) as db:
        assert db.counts(run)["succeeded"] == n
        for job in db.jobs(run):
            assert [a.state for a in db.attempts(job.key)] == ["succeeded"], job.id
    done = sorted(int(x) for x in effects.read_text().split())
    assert done == list(range(1, n + 1)), "a job ran twice, or not at all"
    assert lines_during < n, "every job was done before the store went away"
    assert "retrying" in err  # it said it was waiting
