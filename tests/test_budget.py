"""Cost and caps with the local provider and a price set in jobfleet.toml: caps that cannot
hold are refused before anything is stored; max_total_cost and absolute_timeout stop a run
(fleet scaled to zero, jobs left queued) and the run goes on later; cost estimates."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Jobfleet, pids_with, write_csv
from jobfleet.fleet.cost import Budget, Estimate, Price, worker_price


@pytest.fixture
def local(jf: Jobfleet, tmp_path: Path) -> Path:
    jf.env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return tmp_path


def config(path: Path, **fleet: object) -> None:
    lines = ['provider = "local"'] + [f"{k} = {v!r}" for k, v in fleet.items()]
    (path / "jobfleet.toml").write_text("[fleet]\n" + "\n".join(lines).replace("'", '"') + "\n")


def test_max_total_cost_stops_the_run_and_it_goes_on_later(jf: Jobfleet, local: Path) -> None:
    # $36 a worker-hour is a cent a second: 5 cents buy about 5 s of one worker
    config(local, name="b1", price=36.0, max_total_cost=0.05, max_workers=1, slots=1)
    jobs = write_csv(local / "jobs.csv", ["command"], [["sleep 1"]] * 12)
    p = jf("run", str(jobs), timeout=120, check=1)
    assert "stopped: budget" in p.stderr and "max_total_cost $0.05" in p.stderr
    assert "fleet cost: $0.0" in p.stdout
    run = jf.json("runs")[0]["run"]
    status = jf.json("status", run)
    assert status["state"] == "stopped: budget"
    assert 0 < status["cost"] <= 0.05
    assert status["counts"]["queued"] > 0  # left for later, not failed
    assert status["counts"]["succeeded"] < 12
    assert not pids_with("b1-"), "the fleet was not scaled to zero"
    assert "run_stopped" in [e["kind"] for e in jf.json("events", run)]

    # with the cap raised, the run goes on where it stopped
    p = jf("fleet", "autoscale", "--run", run, env={"JOBFLEET_MAX_TOTAL_COST": "5"},
           timeout=120, check=0)
    assert "going on with it" in p.stdout
    status = jf.json("status", run)
    assert status["state"] == "finished" and status["counts"]["succeeded"] == 12
    assert status["cost"] > 0.02
    assert not pids_with("b1-")


def test_absolute_timeout_stops_the_run(jf: Jobfleet, local: Path) -> None:
    config(local, name="b2", absolute_timeout="3s", max_workers=1, slots=1)
    jobs = write_csv(local / "jobs.csv", ["command"], [["sleep 30"]] * 3)
    # the workers it stops drain for a second, not the default 30 s
    p = jf("run", str(jobs), timeout=90, check=1, env={"JOBFLEET_DRAIN_SECONDS": "1"})
    assert "stopped: timeout" in p.stderr
    run = jf.json("runs")[0]["run"]
    assert jf.json("status", run)["state"] == "stopped: timeout"
    assert not pids_with("b2-")


def test_caps_that_cannot_hold_are_refused_before_anything_is_stored(
        jf: Jobfleet, local: Path) -> None:
    jobs = write_csv(local / "jobs.csv", ["command"], [["true"]])
    config(local, name="b3", price=10.0, max_hourly_cost=5.0)
    p = jf("run", str(jobs), check=2)
    assert "one worker costs $10/h" in p.stderr and "max_hourly_cost $5/h" in p.stderr
    config(local, name="b3", max_workers=501)
    p = jf("run", str(jobs), check=2)
    assert "above the ceiling of 500" in p.stderr and "workers_ceiling" in p.stderr
    (local / "jobfleet.toml").write_text('[fleet]\nprovider = "ssh"\nmax_total_cost = 10\n'
                                         '[providers.ssh]\nhosts = "me@127.0.0.1"\n')
    p = jf("run", str(jobs), check=2)
    assert "price of a worker-hour is unknown" in p.stderr and "[fleet] price" in p.stderr
    assert jf.json("runs") == []


def test_max_hourly_cost_limits_the_fleet_size() -> None:
    b = Budget(Price("m5.large", 0.096, "table"), max_hourly_cost=1.0)
    assert b.workers_allowed() == 10
    assert Budget(Price("x", 0.5, "t"), max_hourly_cost=1.0).workers_allowed() == 2


def test_prices_come_from_the_table_overrides_and_fargate_sizes() -> None:
    assert worker_price("aws", {"instance_type": "m5.large"}).per_hour == 0.096
    spot = worker_price("aws", {"instance_type": "m5.large", "market": "spot"})
    assert spot.per_hour is not None and spot.per_hour < 0.096 and "spot" in spot.label
    assert worker_price("aws", {"instance_type": "m5.large"}, overrides={"m5.large": 0.2}
                        ).per_hour == 0.2
    assert worker_price("aws", {"instance_type": "zz.huge"}).per_hour is None
    fargate = worker_price("aws", {"mode": "ecs", "cpu": 1024, "memory": 2048})
    assert fargate.per_hour == pytest.approx(0.04048 + 2 * 0.004445)
    assert worker_price("local", {}).per_hour == 0.0
    assert worker_price("slurm", {}).per_hour is None
    e = Estimate(jobs=100, seconds=60, workers=10, slots=2, price=Price("x", 1.0, "t"))
    assert e.wall == 300 and e.cost == pytest.approx(10 * 300 / 3600)


def test_cost_estimate_times_sample_jobs(jf: Jobfleet, local: Path) -> None:
    config(local, name="b4", price=3.6, max_workers=2)
    jobs = write_csv(local / "jobs.csv", ["command"],
                     [["sleep 0.3; echo x >> ran.txt"]] * 40)
    est = jf.json("cost", "estimate", str(jobs), "--sample", "2")
    assert len(est["sampled"]) == 2 and (local / "ran.txt").read_text().count("x") == 2
    assert 0.25 < est["seconds_per_job"] < 2
    assert est["workers"] == 2 and est["price_per_worker_hour"] == 3.6
    assert est["cost"] == pytest.approx(est["worker_hours"] * 3.6)
