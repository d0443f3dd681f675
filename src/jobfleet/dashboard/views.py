"""What the pages and the JSON API show, computed from the store's public methods only."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from jobfleet.blobs import Blobs, log_key
from jobfleet.errors import NotFound
from jobfleet.store import STATES, TERMINAL, Attempt, Event, Job, Run, Store, WorkerInfo

#: the window over which an active run's rate is measured, seconds
RATE_WINDOW = 60.0
#: runs looked at to find workers' current jobs and fleet totals
RUNS_SCANNED = 200
#: a job page shows at most this many bytes of a log at once (the API pages through the rest)
LOG_PAGE = 256 * 1024


@dataclass(frozen=True, slots=True)
class RunView:
    """A run with its counts, progress and speed."""

    run: Run
    counts: dict[str, int]
    rate: float | None  # jobs/s: over the last minute while active, on average once settled
    took: float | None  # seconds from creation to the last job's end, once settled

    @property
    def done(self) -> int:
        return self.run.total - self.counts["queued"] - self.counts["running"]

    @property
    def state(self) -> str:
        """active, finished or cancelled (the words `jobfleet runs` uses)."""
        if self.counts["queued"] or self.counts["running"]:
            return "active"
        return "cancelled" if self.run.cancelled else "finished"

    @property
    def eta(self) -> float | None:
        """Seconds until the run ends at its current rate; None when unknown or settled."""
        left = self.run.total - self.done
        return left / self.rate if self.state == "active" and self.rate and left else None

    @property
    def segments(self) -> list[tuple[str, float]]:
        """(state, percent of all jobs) for the progress bar, states with no jobs left out."""
        total = max(1, self.run.total)
        return [(s, 100.0 * self.counts[s] / total) for s in STATES if self.counts[s]]


class RunViews:
    """Builds RunViews; a settled run's average rate is remembered until its counts change."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._settled: dict[tuple[str, tuple[int, ...]], tuple[float | None, float | None]] = {}
        self._lock = threading.Lock()

    def view(self, db: Store, run: Run) -> RunView:
        counts = db.counts(run.id)
        if counts["queued"] or counts["running"]:
            now = self.clock()
            window = min(RATE_WINDOW, now - run.created_at)
            recent = len(db.ended(run.id, since=now - RATE_WINDOW, results=False))
            rate = recent / window if window > 0.5 else None
            return RunView(run, counts, rate, None)
        key = (run.id, tuple(counts[s] for s in STATES))
        with self._lock:
            known = self._settled.get(key)
        if known is None:
            ends = [e.finished_at for e in db.ended(run.id, results=False)]
            took = max(ends) - run.created_at if ends else None
            rate = len(ends) / took if took and took > 0 else None
            known = (rate, took)
            with self._lock:
                if len(self._settled) > 10_000:
                    self._settled.clear()
                self._settled[key] = known
        return RunView(run, counts, *known)

    def all(self, db: Store, limit: int) -> list[RunView]:
        return [self.view(db, r) for r in db.runs(limit)]


# -- workers ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkerView:
    info: WorkerInfo
    state: str  # running, draining, silent (no heartbeat within its lease), stopped, lost
    heartbeat_age: float
    jobs: list[str] = field(default_factory=list)  # ids of the jobs it is running

    @property
    def alive(self) -> bool:
        return self.state in ("running", "draining")


def liveness(w: WorkerInfo, now: float) -> str:
    """`running`/`draining` only while heartbeats arrive; `silent` once they stopped."""
    if w.state not in ("running", "draining"):
        return w.state
    return w.state if now - w.heartbeat_at < w.lease_seconds else "silent"


def running_jobs(db: Store, runs: list[Run] | None = None) -> list[Job]:
    """Jobs running now, over the newest runs."""
    found: list[Job] = []
    for r in runs if runs is not None else db.runs(RUNS_SCANNED):
        if db.counts(r.id)["running"]:
            found.extend(db.jobs(r.id, "running"))
    return found


def worker_views(db: Store, now: float | None = None) -> list[WorkerView]:
    """Every worker that has used the store, newest first, with the jobs it runs now."""
    now = time.time() if now is None else now
    by_worker: dict[str, list[str]] = defaultdict(list)
    for j in running_jobs(db):
        if j.worker_id:
            by_worker[j.worker_id].append(j.id)
    return [WorkerView(w, liveness(w, now), max(0.0, now - w.heartbeat_at), by_worker[w.id])
            for w in db.workers()]


@dataclass(frozen=True, slots=True)
class HostView:
    """One machine of the fleet: its live workers and what they offer."""

    host: str
    workers: int
    slots: int
    cpus: float
    busy: int  # jobs running there


def fleet(workers: list[WorkerView]) -> list[HostView]:
    """Live workers grouped by host."""
    hosts: dict[str, list[WorkerView]] = defaultdict(list)
    for w in workers:
        if w.alive:
            hosts[w.info.host].append(w)
    return [HostView(h, len(ws), sum(w.info.slots for w in ws), sum(w.info.cpus for w in ws),
                     sum(len(w.jobs) for w in ws)) for h, ws in sorted(hosts.items())]


# -- one job ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobView:
    job: Job
    attempts: list[Attempt]
    events: list[Event]

    @property
    def finished(self) -> bool:
        return self.job.state in TERMINAL

    @property
    def retryable(self) -> bool:
        return self.job.state in ("failed", "cancelled")

    @property
    def cancellable(self) -> bool:
        return self.job.state in ("queued", "running")


def job_view(db: Store, ref: str) -> JobView:
    j = db.job(ref)
    return JobView(j, db.attempts(j.key), db.events(job_key=j.key))


@dataclass(frozen=True, slots=True)
class LogPage:
    """A piece of one attempt's log; `complete` once the attempt has ended and all is read."""

    attempt: int
    offset: int  # where the text starts
    next_offset: int
    text: str
    complete: bool
    job_state: str
    more: bool = False  # more is there to read right away (the page was full)


def read_log(db: Store, blobs: Blobs, ref: str, attempt: int | None = None, offset: int = 0,
             limit: int = LOG_PAGE, tail: bool = False) -> LogPage:
    """Read a job's log (the latest attempt unless told) from `offset`, or with `tail` its
    last `limit` bytes.

    The job's state is read before the log, so when the attempt had already ended, the text
    read after it is all there is.
    """
    j = db.job(ref)
    if j.attempts == 0:
        return LogPage(0, 0, 0, "", j.state in TERMINAL, j.state)
    n = attempt or j.attempts
    if not 1 <= n <= j.attempts:
        raise NotFound(f"job {j.id} has no attempt {n}", hint=f"it has 1 to {j.attempts}")
    ended = n < j.attempts or j.state != "running"
    key = log_key(j.run_id, j.seq, n)
    if tail:
        offset = max(0, (blobs.size(key) or 0) - limit)
    data = blobs.read(key, offset, limit)
    if offset and tail:  # start at a whole character
        skip = next((i for i, b in enumerate(data[:4]) if b & 0xC0 != 0x80), 0)
        data, offset = data[skip:], offset + skip
    full = len(data) >= limit
    complete = ended and not full
    # a page that may go on ends at a whole UTF-8 character; the rest comes with the next one
    cut = len(data) if complete else _whole_chars(data)
    return LogPage(n, offset, offset + cut, data[:cut].decode("utf-8", "replace"), complete,
                   j.state, full)


def _whole_chars(data: bytes) -> int:
    """How many leading bytes of `data` end on a whole UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return len(data)
        if b >= 0xC0:  # the lead byte of the last character
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)
