"""The store interface: runs, jobs, attempts, workers and events, and the records it returns."""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobfleet.errors import NotFound, SpecError
from jobfleet.spec.model import JobSpec

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, SKIPPED = (
    "queued", "running", "succeeded", "failed", "cancelled", "skipped")
#: every job state, in the order the CLI shows them
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, SKIPPED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, SKIPPED})
#: not a state: running jobs that their worker reports stalled, as a filter of `jobs()`
STALLED = "stalled"
#: an outcome, not a state: a job leased ahead went back unstarted
UNSTARTED = "unstarted"
#: the longest wait between retries, whatever the job's retry_delay
MAX_BACKOFF = 300.0

Clock = Callable[[], float]
#: what a run id (or a prefix of one) looks like
_RUN_REF = re.compile(r"[0-9a-z]+\Z")


def state_filter(state: str | None) -> str | None:
    """`state` checked as a filter of `Store.jobs`: a state or STALLED (None, "": every job)."""
    if state and state not in STATES and state != STALLED:
        raise SpecError(f"unknown state '{state}'",
                        hint=f"states are: {', '.join(STATES)}; and {STALLED} (running ones)")
    return state or None


def job_id(run_id: str, seq: int) -> str:
    """The public id of a job: its run's id and its 1-based position in the job file."""
    return f"{run_id}-{seq}"


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    name: str | None
    source: str | None
    workdir: str | None
    created_at: float
    total: int
    cancelled: bool
    stopped: str | None = None  # why its fleet stopped working it: budget, timeout


@dataclass(frozen=True, slots=True)
class Usage:
    """Worker time a fleet spent on a run, for one instance type, and what it cost."""

    instance_type: str
    worker_seconds: float
    cost: float


@dataclass(frozen=True, slots=True)
class Job:
    key: int  # the store's internal row key
    run_id: str
    seq: int
    name: str | None
    state: str
    attempts: int
    max_attempts: int
    exit_code: int | None
    signal: int | None
    reason: str | None
    started_at: float | None
    finished_at: float | None
    not_before: float
    worker_id: str | None
    spec_json: str
    peak_rss: int | None = None  # bytes, of the latest finished attempt
    #: a running job's worker saw no output and no CPU use from it since then (store clock)
    stalled_since: float | None = None

    @property
    def id(self) -> str:
        return job_id(self.run_id, self.seq)

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_json(self.spec_json)


@dataclass(frozen=True, slots=True)
class Attempt:
    job_key: int
    number: int
    worker_id: str | None
    state: str  # running, succeeded, failed, lost, cancelled, released, skipped
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    signal: int | None
    reason: str | None
    peak_rss: int | None
    log: str | None


@dataclass(frozen=True, slots=True)
class Lease:
    """A job handed to one worker for one attempt; `token` fences everything it reports."""

    key: int
    run_id: str
    seq: int
    attempt: int
    token: str
    expires: float
    spec: JobSpec
    run_workdir: str | None
    payload: bytes | None = None  # a Python call's pickled call; None for a shell command

    @property
    def id(self) -> str:
        return job_id(self.run_id, self.seq)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one leased attempt.

    status: succeeded, failed, skipped, cancelled, released (stopped and handed back, e.g.
    when a worker drains; it does not use up an attempt), or unstarted (leased ahead and
    handed back before it started: no attempt is recorded).
    """

    key: int
    token: str
    status: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    peak_rss: int | None = None
    log: str | None = None
    result: bytes | None = None  # a Python call's pickled result or exception
    started_at: float | None = None  # when it really started, if later than its lease


@dataclass(frozen=True, slots=True)
class Ended:
    """A job that reached a final state, as a caller waiting for results sees it."""

    seq: int
    state: str
    reason: str | None
    result: bytes | None
    finished_at: float


@dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat's answer: leases this worker lost, and jobs it must cancel."""

    lost: frozenset[int] = frozenset()
    cancel: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a worker can still take: free slots and resources."""

    slots: int
    cpus: float
    memory: int  # bytes
    gpus: int = 0


@dataclass(frozen=True, slots=True)
class Demand:
    """What jobs still ask of a fleet: those queued (waiting out a backoff included) and
    running, their resources summed, and the running ones per worker."""

    queued: int
    running: int
    cpus: float
    memory: int  # bytes
    gpus: int
    busy: dict[str, int] = field(default_factory=dict)  # worker id -> jobs it runs

    @property
    def jobs(self) -> int:
        return self.queued + self.running


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    slots: int
    cpus: float
    memory: int
    gpus: int
    lease_seconds: float
    run_id: str | None
    state: str  # running, draining, stopped
    started_at: float
    heartbeat_at: float
    jobs_done: int


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str
    run_id: str | None
    job_key: int | None
    worker_id: str | None
    detail: dict[str, object] = field(default_factory=dict)

    @staticmethod
    def detail_of(text: str | None) -> dict[str, object]:
        return json.loads(text) if text else {}


@dataclass(frozen=True, slots=True)
class NewRun:
    """What `submit` needs besides the jobs."""

    name: str | None = None
    source: str | None = None
    workdir: str | None = None
    id: str | None = None  # chosen by the store when not given


class Store(abc.ABC):
    """Durable queue semantics: lease with token and expiry, heartbeat, fenced finish, retry."""

    #: where the store is, fit to print (no password)
    url: str
    #: what another process needs to open the same store; it may hold a password, so it goes
    #: to other processes through the environment (JOBFLEET_STORE), never a command line
    location: str

    # -- submission -------------------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, run: NewRun, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None) -> str:
        """Store a run and all its jobs in one transaction; returns the run id.

        `payloads`, one per job, makes the jobs Python calls (see `jobfleet.api`).
        """

    @abc.abstractmethod
    def append(self, run_id: str, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None, request: str | None = None) -> int:
        """Add jobs to an existing run in one transaction; returns the first new seq.

        `request` (an id the caller chose) is kept with the `appended` event, so a caller
        that lost the answer can ask `appended_by` whether it was done."""

    def appended_by(self, run_id: str, request: str) -> int | None:
        """The first seq of the append made with `request`, if one was."""
        for e in reversed(self.events(run_id)):
            if e.kind == "appended" and e.detail.get("request") == request:
                return int(str(e.detail["first"]))
        return None

    # -- the worker's side ------------------------------------------------------------------
    @abc.abstractmethod
    def register_worker(self, worker: WorkerInfo) -> None: ...

    @abc.abstractmethod
    def set_worker_state(self, worker_id: str, state: str, jobs_done: int | None = None) -> None:
        """Record a worker's state (and how many jobs it has finished, when given)."""

    @abc.abstractmethod
    def lease(
        self, worker_id: str, free: Capacity, lease_seconds: float, run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> list[Lease]:
        """Hand out up to `free.slots` ready jobs that fit in `free` together, each with a new
        token, in queue order.

        `ahead` asks for up to `ahead.slots` more jobs, each fitting in `ahead` on its own: a
        worker running short jobs holds them to start as its slots free up, instead of asking
        the store again after every job.
        """

    @abc.abstractmethod
    def heartbeat(
        self,
        worker_id: str,
        leases: Sequence[tuple[int, str]],
        lease_seconds: float,
        jobs_done: int | None = None,
    ) -> Beat:
        """Extend the leases (key, token) still held; report lost ones and cancel requests.

        `jobs_done` (jobs this worker has finished so far) is recorded with the beat.
        """

    @abc.abstractmethod
    def mark_stalled(self, worker_id: str, key: int, token: str, quiet_for: float | None) -> bool:
        """Record that a running attempt has made no progress (no output, no CPU use) for
        `quiet_for` seconds, or (None) that it makes progress again; with an event either
        way. False when the token no longer holds the lease."""

    @abc.abstractmethod
    def cancel_requests(self, worker_id: str) -> frozenset[int]:
        """Keys of this worker's running jobs that a user asked to cancel (a cheap read)."""

    @abc.abstractmethod
    def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[int]:
        """Record outcomes; returns keys whose token was stale (nothing recorded for them)."""

    def exchange(
        self,
        worker_id: str,
        outcomes: Sequence[Outcome],
        free: Capacity,
        lease_seconds: float,
        run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> tuple[list[int], list[Lease]]:
        """`finish` then `lease`, in one round trip where the store can."""
        return (self.finish(worker_id, outcomes),
                self.lease(worker_id, free, lease_seconds, run_id, ahead))

    #: whether `wait_for_work` can hear of new work (else it returns at once and callers poll)
    hears_work: bool = False

    def wait_for_work(self, timeout: float, also: int | None = None) -> None:
        """Block until new work may be ready, `timeout` seconds pass, or the file descriptor
        `also` (a worker's signal pipe) becomes readable.

        A store that hears of new work (PostgreSQL's LISTEN, inotify on a SQLite file) returns
        as soon as a job is submitted, appended, retried or goes back to the queue, anywhere;
        it may also return early for no reason, so callers check (`next_due`) before leasing.
        The first call may only start listening and return at once. The default returns at
        once: callers poll.
        """
        return None

    @abc.abstractmethod
    def next_due(self, total: Capacity, run_id: str | None = None) -> float | None:
        """When the earliest queued job that fits in `total` becomes ready; None if none."""

    @abc.abstractmethod
    def forget_worker(self, worker_id: str, reason: str) -> int:
        """A worker is known dead: end its running attempts as lost now; returns how many."""

    @abc.abstractmethod
    def reap(self) -> int:
        """Requeue (or fail) jobs whose lease expired; returns how many."""

    # -- the user's side --------------------------------------------------------------------
    @abc.abstractmethod
    def runs(self, limit: int = 50) -> list[Run]: ...

    def run(self, ref: str) -> Run:
        """The run with this id or unique id prefix (`latest` for the newest)."""
        ref = ref.strip().lower()
        if ref in ("", "latest", "last"):
            newest = self.runs(limit=1)
            if not newest:
                raise NotFound("there are no runs in this store yet",
                               hint=f"submit one with `jobfleet run FILE` (store: {self.url})")
            return newest[0]
        if not _RUN_REF.match(ref):
            raise NotFound(f"'{ref}' is not a run id", hint="run ids are hex, like 3f9a2c1b")
        found = self._runs_by_prefix(ref)
        if not found:
            raise NotFound(f"no run '{ref}' in {self.url}",
                           hint="`jobfleet runs` lists the runs; check --store too")
        if len(found) > 1 and found[0].id != ref:
            raise NotFound(f"'{ref}' names more than one run ({found[0].id}, {found[1].id}, ...)",
                           hint="give more characters of the id")
        return found[0]

    @abc.abstractmethod
    def _runs_by_prefix(self, prefix: str) -> list[Run]:
        """At most two runs whose id starts with `prefix`, in id order."""

    @abc.abstractmethod
    def pending(self, run_id: str) -> int | None:
        """Jobs of the run still queued or running; None while the run does not exist."""

    def demand(self, run_id: str | None = None) -> Demand:
        """What the run's jobs (or every run's) still ask of the workers serving it."""
        by_state = {state: (int(n), float(c or 0), int(m or 0), int(g or 0))
                    for state, n, c, m, g in self._rows(
                        "SELECT state, count(*), sum(cpus), sum(memory), sum(gpus) FROM jobs"
                        " WHERE state IN ('queued', 'running'){run} GROUP BY state", run_id)}
        busy = {w: int(n) for w, n in self._rows(
            "SELECT worker_id, count(*) FROM jobs WHERE state = 'running'{run}"
            " GROUP BY worker_id", run_id)}
        q, r = by_state.get(QUEUED, (0, 0.0, 0, 0)), by_state.get(RUNNING, (0, 0.0, 0, 0))
        return Demand(q[0], r[0], q[1] + r[1], q[2] + r[2], q[3] + r[3], busy)

    @abc.abstractmethod
    def add_usage(self, run_id: str, instance_type: str, worker_seconds: float,
                  cost: float) -> None:
        """Add worker time (and its cost) a fleet spent on the run."""

    @abc.abstractmethod
    def usage(self, run_id: str) -> list[Usage]:
        """What fleets spent on the run, by instance type."""

    @abc.abstractmethod
    def stop_run(self, run_id: str, reason: str | None) -> None:
        """Mark the run stopped by a cap (`reason`: budget, timeout), or (None) resumed; its
        jobs stay as they are, so it can go on later."""

    @abc.abstractmethod
    def _rows(self, sql: str, run_id: str | None) -> list[tuple[Any, ...]]:
        """The rows of `sql`, its `{run}` standing for a filter on `run_id` (when given)."""

    @abc.abstractmethod
    def counts(self, run_id: str) -> dict[str, int]:
        """Jobs per state, with every state present."""

    @abc.abstractmethod
    def jobs(self, run_id: str, state: str | None = None, limit: int | None = None) -> list[Job]:
        ...

    @abc.abstractmethod
    def ended(self, run_id: str, since: float = 0.0, results: bool = True) -> list[Ended]:
        """Jobs of the run in a final state that ended at or after `since` (store clock).

        Without `results` the `result` field is None (a cheaper look).
        """

    @abc.abstractmethod
    def clear_results(self, run_id: str) -> int:
        """Forget the run's stored calls and results; returns how many jobs had any."""

    def job(self, ref: str) -> Job:
        """The job with id `RUN-SEQ` (RUN may be a unique prefix)."""
        run_ref, sep, seq = ref.strip().rpartition("-")
        if not sep or not seq.isdigit():
            raise NotFound(f"'{ref}' is not a job id",
                           hint="job ids are RUN-N, like 3f9a2c1b-17 (`jobfleet jobs RUN` lists them)")
        run = self.run(run_ref or "latest")
        found = self._job_at(run.id, int(seq))
        if found is None:
            raise NotFound(f"run {run.id} has no job {seq}",
                           hint=f"its jobs are numbered 1 to {run.total}")
        return found

    @abc.abstractmethod
    def _job_at(self, run_id: str, seq: int) -> Job | None:
        """Job `seq` of run `run_id`, if there is one."""

    @abc.abstractmethod
    def attempts(self, job_key: int) -> list[Attempt]: ...

    @abc.abstractmethod
    def events(self, run_id: str | None = None, job_key: int | None = None) -> list[Event]: ...

    @abc.abstractmethod
    def workers(self) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    def retry(self, run_id: str, job_key: int | None = None) -> int:
        """Requeue failed jobs (of the run, or one job) with a fresh attempt budget."""

    @abc.abstractmethod
    def cancel(self, run_id: str, job_key: int | None = None) -> tuple[int, int]:
        """Cancel queued jobs now and ask workers to kill running ones; (cancelled, asked)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
