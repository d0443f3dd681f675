"""Crash-atomic submission: `jobfleet submit` SIGKILLed at random points while it reads and
stores a 100,000-job file leaves the whole run or no trace of it; later submits work.

Where the kill lands is steered by watching the store: some kills come while the file is
still being read, the others at a random moment of the write (SQLite: once its write-ahead log
grows; PostgreSQL: once its transaction is open), spread over how long a whole write took.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Jobfleet, write_csv
from pg import fresh_database, require_server

JOBS = 100_000
# several 100,000-job submissions: a margin for a machine busy with other work
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("atomic") / "jobs.csv"
    return write_csv(path, ["command", "n"], [["echo {n}", n] for n in range(1, JOBS + 1)])


class Target:
    """The store under test: its rows read directly, and whether a submit is writing."""

    def __init__(self, kind: str, jf: Jobfleet, url: str | None) -> None:
        self.kind, self.jf, self.url = kind, jf, url
        self._admin: Any = None
        if url is not None:
            import psycopg

            jf.env["JOBFLEET_STORE"] = url
            self._admin = psycopg.connect(url, autocommit=True)

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        if self._admin is not None:
            return [tuple(r) for r in self._admin.execute(sql).fetchall()]
        with contextlib.closing(sqlite3.connect(self.jf.store_path, timeout=30)) as c:
            return c.execute(sql).fetchall()

    def writing(self) -> Callable[[], bool]:
        """A test of whether a submission's write has begun (since this call)."""
        if self._admin is not None:
            sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                   " AND xact_start IS NOT NULL AND pid <> pg_backend_pid()")
            return lambda: self.query(sql)[0][0] > 0
        wal = Path(f"{self.jf.store_path}-wal")
        before = wal.stat().st_size if wal.exists() else 0
        return lambda: wal.exists() and wal.stat().st_size != before

    def runs(self) -> dict[str, int]:
        """Every stored run with its job count, after checking the rows agree with each other."""
        rows = self.query("SELECT r.id, r.total, (SELECT count(*) FROM jobs j WHERE"
                          " j.run_id = r.id) FROM runs r")
        for run, total, stored in rows:
            assert total == stored, f"run {run} says {total} jobs, {stored} stored"
        [(orphans,)] = self.query("SELECT count(*) FROM jobs WHERE run_id NOT IN"
                                  " (SELECT id FROM runs)")
        assert orphans == 0, f"{orphans} jobs of no run"
        [(submitted,)] = self.query("SELECT count(*) FROM events WHERE kind = 'submitted'")
        assert submitted == len(rows), f"{submitted} submissions recorded for {len(rows)} runs"
        return {run: total for run, _, total in rows}


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, jf: Jobfleet) -> Iterator[Target]:
    if request.param == "sqlite":
        made = Target("sqlite", jf, None)
        yield made
        return
    with fresh_database(require_server()) as url:
        made = Target("postgres", jf, url)
        try:
            yield made
        finally:
            made.close()


def submit(jf: Jobfleet, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "jobfleet", "submit", str(path)], cwd=jf.cwd,
                            env=jf.env, text=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until(proc: subprocess.Popen[str], test: Callable[[], bool], timeout: float) -> float:
    """Poll `test` until it holds; the moment it did (or, if `proc` ended first, None)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if test():
            return time.monotonic()
        assert time.monotonic() < deadline, "the submission's write never began"
        time.sleep(0.005)
    raise AssertionError(f"submit ended before its write was seen: {proc.communicate()}")


def test_a_killed_submit_leaves_the_whole_run_or_nothing(jf: Jobfleet, target: Target,
                                                         big_file: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    # a whole submission first: the schema exists after it, and it tells how long each part takes
    started = time.monotonic()
    proc = submit(jf, big_file)
    wrote_at = wait_until(proc, target.writing(), 120)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    reading, writing = wrote_at - started, time.monotonic() - wrote_at
    runs = target.runs()
    assert list(runs.values()) == [JOBS]

    outcomes = []
    # kills at random points of the write (and on SQLite one while the file is read: what
    # comes before the store is the same code for both)
    kills = ("reading", "writing", "writing") if target.kind == "sqlite" else ("writing",)
    for when in kills:
        proc = submit(jf, big_file)
        if when == "reading":
            time.sleep(rng.uniform(0.3, max(0.4, 0.7 * reading)))
        else:
            wait_until(proc, target.writing(), 120)
            time.sleep(rng.uniform(0, writing))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        now = target.runs()
        new = {r: n for r, n in now.items() if r not in runs}
        assert {r: now[r] for r in runs} == runs, f"seed {seed}: a stored run changed"
        assert list(new.values()) in ([], [JOBS]), f"seed {seed}: after a kill {when}: {new}"
        outcomes.append((when, bool(new)))
        runs = now
        # what users see agrees: `jobfleet runs` lists exactly these, each whole
        listed = jf.json("runs", "--limit", "100")
        assert {r["run"]: r["total"] for r in listed} == runs
        assert all(r["counts"]["queued"] == r["total"] for r in listed)
    assert ("reading", True) not in outcomes, outcomes

    # a later submission works, and the store is sound
    small = write_csv(jf.cwd / "small.csv", ["command", "n"], [["echo {n}", n] for n in range(3)])
    run = jf.submit(str(small))
    assert target.runs() == {**runs, run: 3}
    assert jf.json("status", run)["counts"]["queued"] == 3
    if target.kind == "sqlite":
        assert target.query("PRAGMA integrity_check") == [("ok",)]
