"""Chaos, bounded: a few hundred jobs with side effects while workers, the `jobfleet run`
controller and (PostgreSQL) the server are killed and restarted; then no job lost, none recorded
twice, logs complete, no process left, the SQLite file intact.

The engine is benchmarks/soak.py, which runs the same thing for as many jobs as asked (the
long soak's figures are in docs/reliability.md). A failure prints the seed; JOBFLEET_CHAOS_SEED
replays it.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pg import Cluster, require_server

# bounded by the plans below; the margin is for a machine busy with other work
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
#: long enough that a worker starved of CPU on a busy machine (or waiting out a database
#: restart) keeps its leases: only the kills lose attempts, as the checks expect
LEASE = 4.0


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _soak()


def seed() -> int:
    return int(os.environ.get("JOBFLEET_CHAOS_SEED") or secrets.randbelow(2**32))


def check(report: object, plan: object) -> None:
    r = report
    assert isinstance(r, soak.Report)
    said = f"seed {r.seed} (JOBFLEET_CHAOS_SEED={r.seed} replays it)\n{soak.table(r)}\n" + \
        "\n".join(r.problems)
    assert r.states == {"succeeded": r.jobs}, said  # every job terminal, and none lost
    assert r.losses == 0 and r.duplicates == 0, said  # fencing held: one success each
    assert r.missing_logs == 0, said
    assert r.leftover_processes == 0, said
    assert r.lost_not_killed == 0, said  # attempts were lost only to the kills
    assert r.attempts == r.jobs + r.lost_attempts, said
    assert r.reexecutions <= r.lost_attempts, said  # a side effect twice only from a lost one
    assert not r.problems, said
    # the chaos did happen: kills of each kind took jobs with them
    assert sum(r.worker_kills.values()) == plan.worker_kills, said  # type: ignore[attr-defined]
    assert r.controller_kills == 1 + plan.controller_kills, said  # type: ignore[attr-defined]
    assert r.lost_attempts >= 1, said


def test_chaos_sqlite(tmp_path: Path) -> None:
    plan = soak.Plan(jobs=400, worker_kills=8, controller_kills=2, seed=seed(), deadline=80,
                     lease_seconds=LEASE)
    report = soak.soak(tmp_path, str(tmp_path / "jobfleet.db"), plan)
    check(report, plan)
    assert report.integrity == "ok", soak.table(report)


def test_chaos_postgres(tmp_path: Path) -> None:
    require_server()  # the binaries come with the server: skip (or fail in CI) alike
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        plan = soak.Plan(jobs=300, worker_kills=5, controller_kills=2, restarts=2, seed=seed(),
                         deadline=80, lease_seconds=LEASE)
        report = soak.soak(tmp_path, cluster.url, plan, cluster.restart)
    finally:
        cluster.destroy()
    check(report, plan)
    assert report.restarts == 2
