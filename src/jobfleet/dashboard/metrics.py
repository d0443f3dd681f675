"""`/metrics`: the store's state in Prometheus' text format, computed from its public methods.

Jobs by state and workers alive are read fresh on every scrape. The cumulative metrics
(attempts, durations, queue waits, lease expiries, retries) are tallied from each run's events
(the store's timeline of leases, outcomes and retries); a settled run's tally is kept until
something in it changes, so a scrape reads again only the runs that are moving.

Metric names, all prefixed `jobfleet_`:
  jobs{state}                       gauge     jobs in each state
  runs{state}                       gauge     runs active, finished, cancelled
  workers{state}                    gauge     workers by state (silent: heartbeats stopped)
  workers_alive                     gauge     workers whose heartbeats arrive
  throughput_jobs_per_second        gauge     jobs that reached a final state, last minute
  attempts_total{outcome}           counter   attempts ended, by outcome (throughput)
  job_duration_seconds{outcome}     histogram how long attempts ran (succeeded, failed)
  queue_wait_seconds                histogram from when an attempt could start to its start
  lease_expiries_total              counter   attempts lost because their lease ran out
  retries_total{kind}               counter   jobs queued again: automatic (after a failure
                                              within max_attempts) or manual (`retry`)
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from jobfleet.store import STATES, Event, Run, Store

#: runs the metrics cover, newest first
RUNS_COVERED = 1000
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
#: event kinds that end an attempt (the store records a lost attempt as `lease_expired`)
ENDINGS = frozenset({"succeeded", "failed", "lease_expired", "cancelled", "released", "skipped"})
#: outcomes whose run time the duration histogram shows
TIMED = ("succeeded", "failed")
THROUGHPUT_WINDOW = 60.0


@dataclass(slots=True)
class Histogram:
    """Observations counted into fixed buckets (each bucket on its own, made cumulative on output)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def samples(self, name: str, labels: dict[str, str]) -> list[str]:
        lines, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            lines.append(_sample(f"{name}_bucket", {**labels, "le": _number(bound)}, running))
        lines.append(_sample(f"{name}_sum", labels, self.total))
        lines.append(_sample(f"{name}_count", labels, running))
        return lines


@dataclass(slots=True)
class Tally:
    """What one run adds to the cumulative metrics."""

    durations: dict[str, Histogram] = field(
        default_factory=lambda: {o: Histogram(DURATION_BUCKETS) for o in TIMED})
    waits: Histogram = field(default_factory=lambda: Histogram(WAIT_BUCKETS))
    attempts: Counter[str] = field(default_factory=Counter)
    lease_expiries: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    last_at: float = 0.0  # the latest event tallied

    def add(self, other: Tally) -> None:
        for outcome, h in other.durations.items():
            self.durations[outcome].add(h)
        self.waits.add(other.waits)
        self.attempts.update(other.attempts)
        self.lease_expiries += other.lease_expiries
        self.retries.update(other.retries)
        self.last_at = max(self.last_at, other.last_at)


def tally(run: Run, events: Iterable[Event]) -> Tally:
    """Tally one run's timeline.

    An attempt's queue wait runs from when it could first start to when it started: the
    run's creation for a first attempt, the retry time an automatic retry was given (so
    backoff is not counted as waiting), or the moment a user's `retry` requeued the job.
    """
    t = Tally()
    ready: dict[int, float | None] = {}  # job key -> when its next attempt could start
    started: dict[tuple[int, int], float] = {}  # (job key, attempt) -> start
    requeued_run_at: float | None = None  # the latest `retry` of the whole run
    for e in events:
        t.last_at = max(t.last_at, e.at)
        key = e.job_key
        if e.kind == "retried":
            t.retries["manual"] += int(_num(e.detail.get("jobs"), 0))
            if key is None:
                requeued_run_at = e.at
            else:
                ready[key] = e.at
            continue
        if key is None:
            continue
        attempt = int(_num(e.detail.get("attempt"), 0))
        if e.kind == "leased":
            since = ready.get(key, run.created_at)
            if since is None:  # the job had ended; only a retry of the run can have requeued it
                since = requeued_run_at if requeued_run_at is not None else e.at
            t.waits.observe(e.at - since)
            started[key, attempt] = e.at
            ready[key] = e.at  # until this attempt ends
        elif e.kind in ENDINGS:
            outcome = e.kind
            t.attempts[outcome] += 1
            if outcome == "lease_expired":
                t.lease_expiries += 1
            began = started.pop((key, attempt), None)
            if outcome in TIMED and began is not None:
                t.durations[outcome].observe(e.at - began)
            if e.detail.get("then") == "queued" or outcome == "released":
                if outcome != "released":
                    t.retries["automatic"] += 1
                ready[key] = _num(e.detail.get("retry_at"), e.at)
            else:
                ready[key] = None
    return t


def _num(value: object, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default


class Metrics:
    """Renders `/metrics`, keeping the tallies of settled runs between scrapes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._settled: dict[str, tuple[tuple[int, ...], Tally]] = {}
        self._lock = threading.Lock()

    def _tally(self, db: Store, run: Run, counts: dict[str, int]) -> Tally:
        shape = tuple(counts[s] for s in STATES)
        if counts["queued"] or counts["running"]:
            with self._lock:
                self._settled.pop(run.id, None)
            return tally(run, db.events(run_id=run.id))
        with self._lock:
            known = self._settled.get(run.id)
        # unchanged: the same counts and no job ended since (a retry that failed again)
        if (known is not None and known[0] == shape
                and not db.ended(run.id, since=known[1].last_at + 1e-3, results=False)):
            return known[1]
        fresh = tally(run, db.events(run_id=run.id))
        with self._lock:
            self._settled[run.id] = (shape, fresh)
        return fresh

    def render(self, db: Store) -> str:
        now = self.clock()
        jobs: Counter[str] = Counter({s: 0 for s in STATES})
        runs: Counter[str] = Counter({"active": 0, "finished": 0, "cancelled": 0})
        total = Tally()
        recent = 0
        for run in db.runs(RUNS_COVERED):
            counts = db.counts(run.id)
            jobs.update(counts)
            active = bool(counts["queued"] or counts["running"])
            runs["active" if active else "cancelled" if run.cancelled else "finished"] += 1
            t = self._tally(db, run, counts)
            total.add(t)
            if active or t.last_at >= now - THROUGHPUT_WINDOW:
                recent += len(db.ended(run.id, since=now - THROUGHPUT_WINDOW, results=False))
        from jobfleet.dashboard.views import liveness

        workers: Counter[str] = Counter(
            {"running": 0, "draining": 0, "silent": 0, "stopped": 0, "lost": 0})
        workers.update(liveness(w, now) for w in db.workers())

        out: list[str] = []
        _family(out, "jobs", "gauge", "Jobs in each state.",
                [_sample("jobfleet_jobs", {"state": s}, n) for s, n in jobs.items()])
        _family(out, "runs", "gauge", "Runs active, finished or cancelled.",
                [_sample("jobfleet_runs", {"state": s}, n) for s, n in runs.items()])
        _family(out, "workers", "gauge", "Workers by state (silent: heartbeats stopped).",
                [_sample("jobfleet_workers", {"state": s}, n) for s, n in workers.items()])
        _family(out, "workers_alive", "gauge", "Workers whose heartbeats arrive.",
                [_sample("jobfleet_workers_alive", {}, workers["running"] + workers["draining"])])
        _family(out, "throughput_jobs_per_second", "gauge",
                f"Jobs that reached a final state over the last {THROUGHPUT_WINDOW:.0f} seconds.",
                [_sample("jobfleet_throughput_jobs_per_second", {}, recent / THROUGHPUT_WINDOW)])
        _family(out, "attempts_total", "counter", "Attempts ended, by outcome.",
                [_sample("jobfleet_attempts_total", {"outcome": o}, total.attempts[o])
                 for o in sorted(ENDINGS)])
        _family(out, "job_duration_seconds", "histogram",
                "How long attempts ran, by outcome.",
                [line for o in TIMED for line in total.durations[o].samples(
                    "jobfleet_job_duration_seconds", {"outcome": o})])
        _family(out, "queue_wait_seconds", "histogram",
                "From when an attempt could start (submission, retry) to its start.",
                total.waits.samples("jobfleet_queue_wait_seconds", {}))
        _family(out, "lease_expiries_total", "counter",
                "Attempts lost because their worker's lease ran out.",
                [_sample("jobfleet_lease_expiries_total", {}, total.lease_expiries)])
        _family(out, "retries_total", "counter",
                "Jobs queued again: automatic (after a failure) or manual (retry).",
                [_sample("jobfleet_retries_total", {"kind": k}, total.retries[k])
                 for k in ("automatic", "manual")])
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_text: str, samples: list[str]) -> None:
    full = f"jobfleet_{name}"
    out.append(f"# HELP {full} {help_text}")
    out.append(f"# TYPE {full} {kind}")
    out.extend(samples)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else f"{value:.1f}"


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        name = f"{name}{{{inner}}}"
    return f"{name} {_number(value) if isinstance(value, float) else value}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
