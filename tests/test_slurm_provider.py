"""The slurm provider against a real single-node Slurm (tests/slurm.py): workers as array
tasks run a job file from a PostgreSQL store, a worker cancelled mid-run loses nothing,
terminate leaves nothing in the queue, failures say why with the worker's log, and the
store's password never shows on a command line."""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobfleet
from conftest import Jobfleet, wait_for, write_csv
from jobfleet.errors import ConfigError
from jobfleet.fleet import FAILED, LAUNCHING, LIVE, READY, STOPPED, LaunchSpec, Machine
from slurm import SlurmCluster, slurm  # noqa: F401 (the fixture)

JOBS = 8


class Store:
    """A fresh PostgreSQL database owned by a role of its own with a password (the server
    trusts local connections, so the password is carried, not checked)."""

    def __init__(self, url: str, password: str) -> None:
        self.url, self.password = url, password


@pytest.fixture
def store() -> Iterator[Store]:
    import psycopg

    from pg import fresh_database, require_server

    server = require_server()
    role = f"jobfleet_slurm_{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(8)}"
    with fresh_database(server) as url:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            admin.execute(f"ALTER DATABASE {name} OWNER TO {role}")
        try:
            host = url.split("@", 1)[1]
            yield Store(f"postgresql://{role}:{password}@{host}", password)
        finally:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {role}")


class CommandLines:
    """Every command line seen on this machine while it runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        self.seen.add(f.read().replace(b"\0", b" ").decode("utf-8", "replace"))
                except OSError:
                    pass

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


@pytest.fixture
def command_lines() -> Iterator[CommandLines]:
    sampler = CommandLines()
    yield sampler
    sampler.stop()


def provider(tmp_path: Path, **settings: object) -> Any:
    from jobfleet.fleet.slurm import SlurmProvider

    changes: list[Machine] = []
    p = SlurmProvider(f"t{secrets.token_hex(3)}",
                      {"log_dir": str(tmp_path / "slurm-logs"), "time_limit": "10m",
                       "stop_grace": "10s", **settings}, changes.append)
    p.changes = changes  # type: ignore[attr-defined]
    return p


def just_started(db: Any, run: str, worker: str | None = None,
                 since: float = 0.0) -> tuple[str, str] | None:
    """(job id, worker id) of a job of `run` (on `worker`) that started `since` seconds ago
    and under a second ago: a 2-second job sure to be still running when it is killed."""
    for job in db.jobs(run, state="running"):
        age = time.time() - (job.started_at or 0.0)
        if job.worker_id and since <= age < 1.0 and worker in (None, job.worker_id):
            return job.id, job.worker_id
    return None


def phases(p: Any) -> dict[str, str]:
    return {m.id: m.phase for m in p.list()}


def in_queue(cluster: SlurmCluster, job_name: str) -> list[str]:
    """The fleet's jobs squeue still shows as pending or running."""
    return [line for line in cluster.squeue("--name", job_name)
            if line.split()[1] not in ("COMPLETED", "COMPLETING", "CANCELLED", "FAILED")]


def test_workers_finish_a_run_while_one_is_cancelled_mid_job(
        slurm: SlurmCluster, store: Store, jf: Jobfleet, tmp_path: Path,  # noqa: F811
        command_lines: CommandLines) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "n", "max_attempts"],
              [["sleep 2 && echo job {n}", i, 3] for i in range(1, JOBS + 1)])
    jf.env["JOBFLEET_STORE"] = store.url
    run = jf.submit("jobs.csv")
    p = provider(tmp_path)
    spec = LaunchSpec(fleet=p.fleet, run_id=run, slots=1, idle_exit=3, lease_seconds=2,
                      env={"JOBFLEET_STORE": store.url, "JOBFLEET_BLOBS": str(jf.blobs)})

    machines = p.launch(2, spec)
    assert [m.phase for m in machines] == [LAUNCHING, LAUNCHING]
    first, second = machines
    assert first.worker_id == f"{p.fleet}-{first.id}"

    from jobfleet.store import open_store

    with open_store(store.url) as db:
        held, _ = wait_for(lambda: just_started(db, run, first.worker_id), 30, interval=0.05,
                           what="the first worker to start a job")
        assert phases(p)[first.id] == READY
        # SIGKILL to the worker alone: it dies with a job in hand and tells nobody, as on a
        # lost node (a plain scancel would let it record its job's end)
        slurm.run("scancel", "--batch", "--signal=KILL", first.id)
        def ended() -> Machine | None:
            m = next(m for m in p.list() if m.id == first.id)
            return m if m.phase not in LIVE else None

        gone = wait_for(ended, 20, interval=0.2, what="the task to end")
        assert gone.phase == FAILED and "killed by signal 9" in str(gone.reason), gone
        replacement, = p.launch(1, spec)
        wait_for(lambda: db.counts(run)["succeeded"] == JOBS, 60, interval=0.2,
                 what="every job to succeed")

        jobs = db.jobs(run)
        attempts = {j.id: db.attempts(j.key) for j in jobs}
    for job, tries in attempts.items():
        assert [a.state for a in tries].count("succeeded") == 1, (job, tries)
        assert tries[-1].state == "succeeded", (job, tries)
    # the killed worker's job went back to the queue when its lease expired, and ran again
    assert [(a.worker_id, a.state) for a in attempts[held]][0] == (first.worker_id, "lost"), \
        attempts[held]
    assert {t[-1].worker_id for t in attempts.values()} <= {
        second.worker_id, replacement.worker_id}
    for seq in (1, JOBS):
        assert jf("logs", f"{run}-{seq}", check=0).stdout == f"job {seq}\n"
    # each worker wrote its log where the settings say, named after it
    log = tmp_path / "slurm-logs" / f"{second.worker_id}.log"
    assert f"worker {second.worker_id} on " in log.read_text()

    # the workers exit once idle; terminate stops whatever is left, and nothing is
    p.terminate([m.id for m in p.list()])
    assert not [m for m in p.list() if m.phase in LIVE]
    assert in_queue(slurm, p.job_name) == []
    assert {c.phase for c in p.changes} >= {LAUNCHING, READY, STOPPED}

    seen = command_lines.stop()
    assert any("jobfleet worker --id" in line for line in seen), "the sampler saw no worker"
    assert not [line for line in seen if store.password in line]


def test_terminate_drains_running_workers_and_cancels_pending_ones(
        slurm: SlurmCluster, jf: Jobfleet, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    # what the submitting shell holds besides: workers get this shell's environment (as
    # Slurm jobs do), but not its cloud credentials or jobfleet settings
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-workers")
    monkeypatch.setenv("JOBFLEET_STORE", "postgresql://elsewhere/db")
    monkeypatch.setenv("SHELL_ONLY", "kept")
    p = provider(tmp_path)
    spec = LaunchSpec(fleet=p.fleet, run_id=None, slots=1, idle_exit=300,
                      env={"JOBFLEET_STORE": str(jf.store_path),
                           "JOBFLEET_BLOBS": str(jf.blobs)})
    machines = p.launch(3, spec)  # two CPUs: two run, one waits
    ids = [m.id for m in machines]

    def two_running() -> bool:
        now = phases(p)
        return sorted(now[i] for i in ids) == [LAUNCHING, READY, READY]

    wait_for(two_running, 30, interval=0.2, what="two workers running and one pending")
    running = [i for i, phase in phases(p).items() if phase == READY]
    with jf.open_store() as db:
        wait_for(lambda: len([w for w in db.workers() if w.state == "running"]) == 2, 30,
                 what="both workers to register")
        for w in db.workers():
            env = dict(line.split(b"=", 1) for line in
                       Path(f"/proc/{w.pid}/environ").read_bytes().split(b"\0") if b"=" in line)
            assert env[b"JOBFLEET_STORE"] == str(jf.store_path).encode()
            assert env[b"SHELL_ONLY"] == b"kept" and b"AWS_SECRET_ACCESS_KEY" not in env
    p.terminate(ids)
    after = {m.id: m for m in p.list()}
    assert [i for i in ids if after[i].phase in LIVE] == []
    for i in running:  # SIGTERM drained them: their workers exited by themselves
        assert after[i].reason == "its worker exited", after[i]
    pending, = set(ids) - set(running)
    assert after[pending].reason == "cancelled"
    assert in_queue(slurm, p.job_name) == []
    with jf.open_store() as db:
        assert {w.state for w in db.workers()} == {"stopped"}


def test_a_worker_that_cannot_start_is_failed_with_why_and_its_log(
        slurm: SlurmCluster, jf: Jobfleet, tmp_path: Path) -> None:  # noqa: F811
    env = {"JOBFLEET_STORE": str(jf.store_path), "JOBFLEET_BLOBS": str(jf.blobs)}
    wrapper = tmp_path / "bare-python"  # our python without its site-packages: no jobfleet
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    bad_setup = provider(tmp_path, setup="echo fetching the reference data\nfalse\necho never")
    no_python = provider(tmp_path, python="/opt/nowhere/bin/python3")
    no_jobfleet = provider(tmp_path, python=str(wrapper))
    def spec(p: Any) -> LaunchSpec:
        return LaunchSpec(fleet=p.fleet, run_id=None, env=env, version=jobfleet.__version__)

    launched = [p.launch(1, spec(p))[0].id for p in (bad_setup, no_python, no_jobfleet)]

    def failed(p: Any, mid: str) -> Machine | None:
        return next((m for m in p.list() if m.id == mid and m.phase == FAILED), None)

    one = wait_for(lambda: failed(bad_setup, launched[0]), 30, interval=0.2,
                   what="the setup to fail")
    assert "setup failed (exit status 1)" in str(one.reason), one
    assert "fetching the reference data" in one.log_tail
    assert not any("never" in line for line in one.log_tail)
    assert any(c.phase == FAILED for c in bad_setup.changes)
    # tried again, failed again: then the provider submits no more (the autoscaler, told
    # so, stops with the reason instead of filling the queue with failing workers)
    again, = bad_setup.launch(1, spec(bad_setup))
    wait_for(lambda: failed(bad_setup, again.id), 30, interval=0.2, what="the retry to fail")
    refused = bad_setup.launch(2, spec(bad_setup))
    assert [m.phase for m in refused] == [FAILED, FAILED]
    assert "not submitting more" in str(refused[0].reason), refused
    assert "setup failed" in str(refused[0].reason), refused
    assert len(slurm.squeue("--states=all", "--name", bad_setup.job_name)) == 2
    # with the setup fixed, the same fleet launches again at once
    bad_setup.setup = "echo fixed"
    fixed, = bad_setup.launch(1, spec(bad_setup))
    assert fixed.phase == LAUNCHING
    bad_setup.terminate([fixed.id])

    two = wait_for(lambda: failed(no_python, launched[1]), 30, interval=0.2,
                   what="python to be missing")
    assert "python not found" in str(two.reason) and "/opt/nowhere/bin/python3" in str(two.reason)
    assert "exited with status 97" in str(two.reason)

    three = wait_for(lambda: failed(no_jobfleet, launched[2]), 30, interval=0.2,
                     what="jobfleet to be missing")
    assert f"jobfleet {jobfleet.__version__} is needed" in str(three.reason), three
    assert "No module named 'jobfleet'" in str(three.reason), three


def test_a_refused_submission_is_a_failed_machine_not_an_exception(
        slurm: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    p = provider(tmp_path, partition="nosuchpartition")
    machines = p.launch(2, LaunchSpec(fleet=p.fleet, run_id=None))
    assert [m.phase for m in machines] == [FAILED, FAILED]
    assert "sbatch refused" in str(machines[0].reason)
    assert "partition" in str(machines[0].reason).lower()
    assert p.list() == []


def test_bad_settings_are_refused_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobfleet.fleet import provider_named

    with pytest.raises(ConfigError, match="time_limit") as e:
        provider_named("slurm", "f", {"time_limit": "abc"})
    assert "providers.slurm" in str(e.value) and "abc" in str(e.value)
    with pytest.raises(ConfigError, match="no setting 'partiton'"):
        provider_named("slurm", "f", {"partiton": "gpu"})
    with pytest.raises(ConfigError, match="--job-name"):
        provider_named("slurm", "f", {"sbatch_args": "--qos=high --job-name=mine"})
    with pytest.raises(ConfigError, match="time_limit"):
        provider_named("slurm", "f", {"time_limit": "30s"})

    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm commands here
    with pytest.raises(ConfigError, match="sbatch") as e:
        provider_named("slurm", "f", {})
    assert "login node" in str(e.value)


def test_jobfleet_run_on_slurm_finishes_a_job_file_despite_a_cancelled_worker(
        slurm: SlurmCluster, store: Store, jf: Jobfleet, tmp_path: Path,  # noqa: F811
        command_lines: CommandLines) -> None:
    """`jobfleet run jobs.csv --provider slurm`: the autoscaler submits the workers, one is
    cancelled with scancel mid-job, its job is retried, the run ends with every job
    succeeded once, and the fleet is taken down with nothing left in the queue."""
    fleet = f"e2e{secrets.token_hex(3)}"
    (tmp_path / "jobfleet.toml").write_text(f"""\
[fleet]
max_workers = 2
idle_exit = "5s"

[providers.slurm]
log_dir = "{tmp_path / 'slurm-logs'}"
time_limit = "10m"
stop_grace = "10s"
""")
    write_csv(tmp_path / "jobs.csv", ["command", "n"],
              [["sleep 2 && echo job {n}", i] for i in range(1, JOBS + 1)])
    jf.env.update(JOBFLEET_STORE=store.url, SLURM_CONF=str(slurm.conf))
    proc = jf.popen("run", "jobs.csv", "--provider", "slurm", "--fleet", fleet, "--slots", "1",
                    "--lease-seconds", "2")

    from jobfleet.store import open_store

    with open_store(store.url) as db:
        def started() -> tuple[str, str] | None:
            runs = db.runs()
            # its process has started by then (scancel signals the worker's processes, and
            # a draining worker lets a job leased a moment before still start)
            return just_started(db, runs[0].id, since=0.3) if runs else None

        held, worker = wait_for(started, 60, interval=0.05, what="a slurm worker to start a job")
        assert worker.startswith(f"{fleet}-"), worker
        slurm.run("scancel", worker.removeprefix(f"{fleet}-"))  # as a user would
        out, errors = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{errors}"
        run = db.runs()[0].id
        attempts = {j.id: db.attempts(j.key) for j in db.jobs(run)}
    assert len(attempts) == JOBS
    for job, tries in attempts.items():
        assert [a.state for a in tries].count("succeeded") == 1, (job, tries)
        assert tries[-1].state == "succeeded", (job, tries)
    # the cancelled worker's job failed there (killed by scancel's SIGTERM) and ran again
    first, *_, last = attempts[held]
    assert first.worker_id == worker and first.state != "succeeded", attempts[held]
    assert last.worker_id != worker, attempts[held]
    assert "nothing is left" in out, out
    assert in_queue(slurm, f"jobfleet-{fleet}") == []
    seen = command_lines.stop()
    assert any("jobfleet worker --id" in line for line in seen), "the sampler saw no worker"
    assert not [line for line in seen if store.password in line]


def test_what_sacct_and_squeue_say_is_read_as_slurm_writes_it() -> None:
    """Rows as sacct writes them on a cluster with accounting (none runs here: the one-node
    cluster keeps none), exit statuses both ways Slurm writes them, and time limits."""
    from jobfleet.fleet.slurm_queue import exit_status, parse_sacct, slurm_time

    rows = parse_sacct("4711_0|FAILED|1:0|node1|jobfleet run=ab12cd34 config=0a1b2c3d4e\n"
                       "4711_0.batch|FAILED|1:0|node1|\n"
                       "4711_1|CANCELLED by 1000|0:15|node2|\n"
                       "4712|COMPLETED|0:0|node3|\n")
    assert [(t.id, t.state, t.exit, t.nodes) for t in rows] == [
        ("4711_0", "FAILED", "1:0", "node1"), ("4711_1", "CANCELLED", "0:15", "node2")]
    assert rows[0].tag("run") == "ab12cd34" and rows[0].tag("config") == "0a1b2c3d4e"
    assert rows[1].tag("run") is None
    assert exit_status("1:0") == (1, None) and exit_status("0:15") == (0, 15)
    assert exit_status("768") == (3, None) and exit_status("9") == (0, 9)
    assert exit_status("") == (None, None)
    assert slurm_time(3600) == "0-01:00:00" and slurm_time(61) == "0-00:02:00"
    assert slurm_time(2 * 86400 + 1800) == "2-00:30:00"
