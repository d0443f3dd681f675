"""`Run`: a handle on a run of Python calls, from the process that submitted it or any other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobfleet.api import wire
from jobfleet.blobs import Blobs, LocalBlobs, open_blobs
from jobfleet.config import load_settings
from jobfleet.errors import JobfleetError
from jobfleet.store import Store, open_store
from jobfleet.store.base import Ended

#: how often a waiting caller looks at the store, seconds: soon after a quiet spell, every
#: POLL_BUSY while jobs keep ending (each look reads what ended in the last OVERLAP), backing
#: off to POLL_SLOW while nothing does
POLL_FAST, POLL_BUSY, POLL_SLOW = 0.005, 0.02, 0.1
#: a job is looked for until this long after the last end seen: stores record the end time
#: inside the transaction that commits it, so a commit is visible moments after that time
OVERLAP = 0.25


def next_poll(delay: float, found: bool) -> float:
    return POLL_BUSY if found else min(POLL_SLOW, max(POLL_FAST, delay * 1.5))
#: local workers started for a run exit after this long without work, seconds
IDLE_EXIT = 3.0


class CallFailed(Exception):
    """A call failed without an exception of its own: its interpreter died, it timed out, ..."""

    def __init__(self, job: str, reason: str | None) -> None:
        super().__init__(f"job {job} failed: {reason or 'no reason recorded'}")
        self.job, self.reason = job, reason


class StillRunning(JobfleetError):
    """The run still has jobs queued or running."""


def connect(store: str | None, blobs: str | None) -> tuple[Store, Blobs]:
    s = load_settings({"store": store, "blobs": blobs})
    db = open_store(s.store)
    paired: Blobs | None = getattr(db, "blobs", None)  # a `jobfleet server`'s own blob store
    return db, paired or open_blobs(s.blobs)


def start_worker(store: Store, blobs: Blobs, run_id: str, slots: int) -> subprocess.Popen[bytes]:
    """A local worker for the run (stored, or about to be), in its own session: it outlives
    this process and exits when idle. The run is of Python calls: it starts its warm
    interpreters at once."""
    # the worker's own output stays on this machine: beside a local store, else in .jobfleet
    base = blobs.root if isinstance(blobs, LocalBlobs) else Path(".jobfleet").absolute()
    log_dir = base / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    # the store's location may hold a password: the environment carries it, not argv (`ps`)
    env = {**os.environ, "JOBFLEET_STORE": store.location, "JOBFLEET_BLOBS": blobs.location}
    with open(log_dir / f"{run_id}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "jobfleet", "worker", "--run", run_id, "--slots", str(slots),
             "--idle-exit", str(IDLE_EXIT), "--warm-calls"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def value_of(blobs: Blobs, job: str, e: Ended) -> tuple[bool, Any]:
    """(True, value) or (False, exception) for an ended job."""
    if e.state == "cancelled":
        from concurrent.futures import CancelledError

        return False, CancelledError(f"job {job} was cancelled")
    if e.result is None:
        if e.state == "succeeded":
            return False, CallFailed(job, "its result was cleaned up")
        return False, CallFailed(job, e.reason)
    return wire.outcome_value(wire.open_envelope(blobs, e.result))


class Run:
    """A run of calls: its status, its results in item order or as they come, cancel, cleanup."""

    def __init__(self, run_id: str, store: Store, blobs: Blobs) -> None:
        self.id, self._store, self._blobs = run_id, store, blobs

    def __repr__(self) -> str:
        return f"<jobfleet.Run {self.id} {self.status()}>"

    def status(self) -> dict[str, int]:
        """Jobs by state."""
        return self._store.counts(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, int]:
        """Block until no job is queued or running; returns the counts. TimeoutError if not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = POLL_FAST
        while self._store.pending(self.id):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.id} still has jobs after {timeout}s: {self.status()}")
            time.sleep(delay)
            delay = next_poll(delay, False)
        return self.status()

    def as_completed(self, timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        """(item index, value or exception) as jobs end, until all have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: set[int] = set()
        since, delay = 0.0, POLL_FAST
        total = self._store.run(self.id).total
        while len(seen) < total:
            fresh = [e for e in self._store.ended(self.id, since) if e.seq not in seen]
            for e in sorted(fresh, key=lambda e: e.finished_at):
                seen.add(e.seq)
                since = max(since, e.finished_at - OVERLAP)
                yield e.seq - 1, value_of(self._blobs, f"{self.id}-{e.seq}", e)[1]
            if len(seen) == total:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.id}: {total - len(seen)} jobs not done after {timeout}s")
            delay = next_poll(delay, bool(fresh))
            time.sleep(delay)

    def results(self, ordered: bool = True, *, raise_errors: bool = False,
                timeout: float | None = None) -> list[Any]:
        """Every item's value after waiting for the run; a failed item is its exception object,
        or with `raise_errors` the first failure (in item order) is raised."""
        self.wait(timeout)
        ended = sorted(self._store.ended(self.id),
                       key=(lambda e: e.seq) if ordered else (lambda e: e.finished_at))
        values = []
        for e in ended:
            ok, value = value_of(self._blobs, f"{self.id}-{e.seq}", e)
            if not ok and raise_errors:
                raise value
            values.append(value)
        return values

    def cancel(self) -> tuple[int, int]:
        """Cancel queued calls and ask workers to stop running ones; (cancelled, asked)."""
        return self._store.cancel(self.id)

    def cleanup(self, force: bool = False) -> int:
        """Remove the run's stored calls and results; returns how many blobs were removed.

        Refused while jobs are queued or running, unless `force`, which cancels them first.
        """
        pending = self._store.pending(self.id) or 0
        if pending and not force:
            raise StillRunning(f"run {self.id} still has {pending} jobs queued or running",
                               hint="wait() first, or cleanup(force=True) to cancel them")
        if pending:
            self.cancel()
        self._store.clear_results(self.id)
        return sum(self._blobs.delete_prefix(f"{kind}/{self.id}") for kind in ("payloads", "results"))


def attach(run_id: str, *, store: str | None = None, blobs: str | None = None) -> Run:
    """The run with this id (or unique prefix), as `submit_map` returned it."""
    db, blob_store = connect(store, blobs)
    return Run(db.run(run_id).id, db, blob_store)


def runs(*, store: str | None = None, blobs: str | None = None, limit: int = 50) -> list[Run]:
    """The store's runs, newest first."""
    db, blob_store = connect(store, blobs)
    return [Run(r.id, db, blob_store) for r in db.runs(limit)]
