"""Fleets through the provider interface, with the `local` provider: real worker processes on
this machine, started, scaled and stopped by the autoscaler, `run --provider` and `fleet`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from conftest import Jobfleet, pids_with, wait_for, write_csv
from jobfleet.errors import ConfigError
from jobfleet.fleet import LIVE, LaunchSpec, provider_named
from jobfleet.fleet.autoscale import Autoscaler, down, workers_needed
from jobfleet.spec import JobSpec
from jobfleet.store import Demand, NewRun

#: fleet names, unique to this test session (a worker's command line holds its fleet's name)
T1, T2, T3, T4, T5 = (f"t{i}{secrets.token_hex(3)}" for i in range(1, 6))


@pytest.fixture
def cache(tmp_path: Path, jf: Jobfleet) -> Path:
    """Where the local provider keeps its workers' pid files and logs, for this test only."""
    jf.env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return tmp_path / "cache" / "jobfleet" / "fleets"


def test_workers_needed_counts_slots_and_resources() -> None:
    spec = LaunchSpec("f", None, slots=4, cpus=4, memory=8 << 30)
    assert workers_needed(Demand(0, 0, 0, 0, 0), spec, 10) == 0
    assert workers_needed(Demand(9, 0, 9, 0, 0), spec, 10) == 3  # 9 jobs, 4 slots each
    assert workers_needed(Demand(2, 0, 2, 40 << 30, 0), spec, 10) == 5  # memory-bound
    assert workers_needed(Demand(100, 3, 103, 0, 0), spec, 10) == 10  # capped


def test_run_on_local_fleet_scales_to_zero(jf: Jobfleet, cache: Path, tmp_path: Path) -> None:
    """`run --provider local` spreads the run over several workers, takes them down at the
    end, and `fleet status` finds nothing left."""
    jobs = write_csv(tmp_path / "jobs.csv", ["command"],
                     [[f"sleep 0.3; echo job {i}"] for i in range(24)])
    p = jf("run", str(jobs), "--provider", "local", "--max-workers", "3", "--slots", "2",
           "--fleet", T1, timeout=120, check=0)
    assert "24 succeeded" in p.stdout
    assert "listed again, nothing is left" in p.stdout
    run = jf.json("runs")[0]["run"]
    workers = {j["worker"] for j in jf.jobs(run).values()}
    assert len(workers) >= 2, workers  # the work really was spread
    assert all(w.startswith(T1 + "-") for w in workers)
    assert not pids_with(T1 + "-"), "a worker of the fleet is still running"
    status = jf.json("fleet", "status", "--provider", "local", "--fleet", T1)
    assert status["machines"] == []


def test_autoscaler_grows_with_the_queue_and_drains_idle_workers(
        jf: Jobfleet, cache: Path) -> None:
    os.environ["XDG_CACHE_HOME"] = str(cache.parent.parent)
    try:
        with jf.open_store() as db:
            run_id = db.submit(NewRun(), [JobSpec("sleep 2")] * 6 + [JobSpec("sleep 12")])
            provider = provider_named("local", T2)
            spec = LaunchSpec(T2, run_id, slots=1, idle_exit=30,
                              env={"JOBFLEET_STORE": db.location,
                                   "JOBFLEET_BLOBS": str(jf.blobs)})
            scaler = Autoscaler(db, provider, spec, max_workers=3, idle_grace=0.5)
            first = scaler.step()
            assert first.wanted == 3 and first.launched == 3
            assert scaler.step().launched == 0  # three live: none more
            # the short jobs end; the long one keeps one worker busy, the others are let go
            wait_for(lambda: db.counts(run_id)["succeeded"] == 6, 30, what="short jobs")
            wait_for(lambda: len(scaler.step().live) == 1, 20, interval=0.3,
                     what="surplus workers drained")
            busy = db.demand(run_id).busy
            assert [m.worker_id for m in provider.list() if m.phase in LIVE] == list(busy)
            wait_for(lambda: db.pending(run_id) == 0, 30, what="the long job")
            assert scaler.step().wanted == 0
            assert down(provider) == []
            assert not pids_with(T2 + "-")
            assert db.counts(run_id)["succeeded"] == 7
    finally:
        del os.environ["XDG_CACHE_HOME"]


def test_keep_alive_leaves_workers_and_says_so(jf: Jobfleet, cache: Path, tmp_path: Path) -> None:
    jobs = write_csv(tmp_path / "jobs.csv", ["command"], [["true"]] * 4)
    p = jf("run", str(jobs), "--provider", "local", "--fleet", T3, "--max-workers", "2",
           "--keep-alive", check=0, timeout=60)
    assert "keep-alive is on" in p.stdout
    status = jf("fleet", "status", "--provider", "local", "--fleet", T3, check=0).stdout
    assert "keep-alive" not in status  # the flag was for that run only
    assert "ready" in status and pids_with(T3 + "-")
    gone = jf("fleet", "down", "--provider", "local", "--fleet", T3, check=0).stdout
    assert "nothing is left" in gone
    assert not pids_with(T3 + "-")


def test_a_dead_controller_leaves_no_worker_behind(
        jf: Jobfleet, cache: Path, tmp_path: Path) -> None:
    """Workers finish the run without the `run` that started them, then exit when idle."""
    (tmp_path / "jobfleet.toml").write_text(f'[fleet]\nname = "{T4}"\nidle_exit = "2s"\n')
    jobs = write_csv(tmp_path / "jobs.csv", ["command"], [["sleep 0.5"]] * 8)
    controller = jf.popen("run", str(jobs), "--provider", "local", "--max-workers", "2",
                          "--slots", "2")
    wait_for(lambda: pids_with(T4 + "-"), 20, what="workers started")
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    run = jf.json("runs")[0]["run"]
    wait_for(lambda: jf.json("status", run)["counts"]["succeeded"] == 8, 30,
             what="the run finished by the workers alone")
    wait_for(lambda: not pids_with(T4 + "-"), 15, what="idle workers exited")


def test_bad_provider_settings_store_nothing(jf: Jobfleet, cache: Path, tmp_path: Path) -> None:
    jobs = write_csv(tmp_path / "jobs.csv", ["command"], [["true"]])
    p = jf("run", str(jobs), "--provider", "nope", check=2)
    assert "unknown provider 'nope'" in p.stderr and "local, ssh, slurm" in p.stderr
    p = jf("run", str(jobs), "--provider", "local", "--fleet", "Bad Name!", check=2)
    assert "fleet name" in p.stderr
    assert jf.json("runs") == []
    with pytest.raises(ConfigError, match="max_workers"):
        (tmp_path / "jobfleet.toml").write_text("[fleet]\nmax_workers = 0\n")
        from jobfleet.fleet.settings import load_fleet_settings

        load_fleet_settings(cwd=tmp_path, env={})


def test_fleet_up_status_down(jf: Jobfleet, cache: Path) -> None:
    p = jf("fleet", "up", "2", "--provider", "local", "--fleet", T5, check=0)
    assert p.stdout.count(": ready") == 2
    wait_for(lambda: len(jf.json("workers")) == 2, 20, what="workers registered")
    status = jf("fleet", "status", "--provider", "local", "--fleet", T5, check=0).stdout
    assert "2 live" in status
    start = time.monotonic()
    assert "2 workers stopped" in jf("fleet", "down", "--provider", "local", "--fleet", T5,
                                     check=0).stdout
    assert time.monotonic() - start < 20  # idle workers drain at once
    assert not pids_with(T5 + "-")


def test_a_job_from_a_folder_this_machine_lacks_runs_in_its_workspace(
        jf: Jobfleet, tmp_path: Path) -> None:
    """A remote worker has no copy of the folder the run was submitted from: its jobs run in
    their own workspace instead of failing; a folder that exists is still used."""
    gone = tmp_path / "on-another-machine"
    gone.mkdir()
    (gone / "jobs.csv").write_text("command\npwd\n")
    p = jf("submit", "jobs.csv", "--json", cwd=gone, check=0)
    run = json.loads(p.stdout)["run"]
    gone.joinpath("jobs.csv").unlink()
    gone.rmdir()
    jf("worker", "--run", run, "--idle-exit", "0.5", check=0)
    (job,) = jf.jobs(run).values()
    assert job["state"] == "succeeded", job
    ran_in = jf.log(run, 1).strip()
    assert ran_in != str(gone) and Path(ran_in).name.startswith("a")
