"""`GatewayStore`: the Store interface spoken over HTTPS to a jobfleet server, so that a worker
(or a client) needs a token, not the database's credentials.

The worker's side (register, lease, exchange, heartbeat, finish, cancels, stalls, waiting for
work) is what a worker token may use; the user's side (submit, runs, jobs, results, cancel,
retry) is a client's. What only an operator on the server does (reap, forget workers, fleet
accounting) is not offered here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from jobfleet.blobs import Blobs
from jobfleet.errors import JobfleetError, NotFound, StoreError
from jobfleet.gateway import wire
from jobfleet.gateway.client import Session
from jobfleet.gateway.logs import PendingLogs, report_refused
from jobfleet.spec.model import JobSpec
from jobfleet.store import (
    Attempt,
    Beat,
    Capacity,
    Ended,
    Event,
    Job,
    Lease,
    NewRun,
    Outcome,
    Run,
    Store,
    WorkerInfo,
)
from jobfleet.store.base import Usage

#: the longest one wait for work lasts at the server, seconds (a proxy may cut longer ones)
_LONGEST_WAIT = 20.0


class GatewayStore(Store):
    """A Store whose every operation is a request to a jobfleet server."""

    hears_work = True

    def __init__(self, session: Session, logs: PendingLogs | None = None) -> None:
        self._s = session
        self.url = self.location = session.url
        self._logs = logs if logs is not None else PendingLogs()
        self._held: dict[str, set[tuple[int, str]]] = {}  # worker id -> (key, token) held
        self._generation: int | None = None  # the last news of work heard from the server
        self._poll: Future[int | None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        #: the server's blob store, through the same connection (set by `gateway.connect`)
        self.blobs: Blobs | None = None

    # -- the worker's side ------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> Any:
        body["logs"] = self._logs.take()
        answer = self._s.json("POST", f"/v1/worker/{path}", json=body)
        report_refused(answer)
        return answer

    def register_worker(self, worker: WorkerInfo) -> None:
        self._post("register", {"worker": wire.record_json(worker)})

    def set_worker_state(self, worker_id: str, state: str, jobs_done: int | None = None) -> None:
        self._post("state", {"worker": worker_id, "state": state, "jobs_done": jobs_done})

    def _holding(self, worker_id: str, leaving: Iterable[tuple[int, str]] = ()) -> list[Any]:
        """The leases (key, token) `worker_id` holds, but for those it is reporting now: after
        a lost answer the server hands back the others it finds, which the worker never saw."""
        with self._lock:
            return sorted(self._held.get(worker_id, set()) - set(leaving))

    def _took(self, worker_id: str, leases: list[Lease],
              gone: Iterable[tuple[int, str]] = ()) -> list[Lease]:
        with self._lock:
            held = self._held.setdefault(worker_id, set())
            held.difference_update(gone)
            held.update((x.key, x.token) for x in leases)
        return leases

    def lease(
        self, worker_id: str, free: Capacity, lease_seconds: float, run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> list[Lease]:
        if free.slots <= 0 and not (ahead and ahead.slots > 0):
            return []
        got = self._post("lease", {
            "worker": worker_id, "free": wire.capacity_json(free), "lease_seconds": lease_seconds,
            "run": run_id, "ahead": wire.capacity_json(ahead), "held": self._holding(worker_id)})
        return self._took(worker_id, [wire.lease_of(x) for x in got["leases"]])

    def exchange(
        self,
        worker_id: str,
        outcomes: Sequence[Outcome],
        free: Capacity,
        lease_seconds: float,
        run_id: str | None = None,
        ahead: Capacity | None = None,
    ) -> tuple[list[int], list[Lease]]:
        keys = [(o.key, o.token) for o in outcomes]
        got = self._post("exchange", {
            "worker": worker_id, "outcomes": [wire.outcome_json(o) for o in outcomes],
            "free": wire.capacity_json(free), "lease_seconds": lease_seconds, "run": run_id,
            "ahead": wire.capacity_json(ahead), "held": self._holding(worker_id, keys)})
        leases = self._took(worker_id, [wire.lease_of(x) for x in got["leases"]], keys)
        return list(got["stale"]), leases

    def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[int]:
        if not outcomes and not self._logs:
            return []
        got = self._post("finish", {"worker": worker_id,
                                    "outcomes": [wire.outcome_json(o) for o in outcomes]})
        self._took(worker_id, [], [(o.key, o.token) for o in outcomes])
        return list(got["stale"])

    def heartbeat(
        self,
        worker_id: str,
        leases: Sequence[tuple[int, str]],
        lease_seconds: float,
        jobs_done: int | None = None,
    ) -> Beat:
        beat = wire.beat_of(self._post("heartbeat", {
            "worker": worker_id, "leases": [list(x) for x in leases],
            "lease_seconds": lease_seconds, "jobs_done": jobs_done}))
        self._took(worker_id, [], [x for x in leases if x[0] in beat.lost])
        return beat

    def mark_stalled(self, worker_id: str, key: int, token: str, quiet_for: float | None) -> bool:
        return bool(self._post("stalled", {"worker": worker_id, "key": key, "token": token,
                                           "quiet_for": quiet_for})["held"])

    def cancel_requests(self, worker_id: str) -> frozenset[int]:
        got = self._s.json("GET", "/v1/worker/cancels", params={"worker": worker_id})
        return frozenset(got["cancel"])

    def next_due(self, total: Capacity, run_id: str | None = None) -> float | None:
        got = self._s.json("POST", "/v1/worker/next_due",
                           json={"total": wire.capacity_json(total), "run": run_id})
        return None if got["due"] is None else float(got["due"])

    def wait_for_work(self, timeout: float, also: int | None = None) -> None:
        """Wait until the server hears of new work (it tells every waiting worker at once),
        `timeout` passes or `also` becomes readable. The first call only asks where the news
        stands and returns; while the server is away this sleeps out the timeout."""
        if self._generation is None:
            with contextlib.suppress(JobfleetError):
                self._generation = self._news(-1, 0.0)
            return
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self._poll is None or self._poll.done():
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="jobfleet-wait")
                self._poll = self._pool.submit(self._news, self._generation, left)
                self._poll.add_done_callback(lambda _: _poke(self._ready_w))
            poller = select.poll()
            poller.register(self._ready_r, select.POLLIN)
            if also is not None:
                poller.register(also, select.POLLIN)
            if not any(fd == self._ready_r for fd, _ in poller.poll(max(1, round(left * 1000)))):
                return  # timed out, or `also`: the wait goes on in the background for next time
            with contextlib.suppress(BlockingIOError):
                os.read(self._ready_r, 64)
            if not self._poll.done():
                continue  # an earlier wait's answer
            try:
                news = self._poll.result()
            except JobfleetError:
                _sleep(deadline - time.monotonic(), also)  # the server is away: nothing came
                return
            if news != self._generation:
                self._generation = news
                return

    def _news(self, since: int, timeout: float) -> int:
        wait = min(max(timeout, 0.0), _LONGEST_WAIT)
        got = self._s.json("GET", "/v1/worker/wait", params={"since": since, "timeout": wait},
                           timeout=wait + 15, retry=False)
        return int(got["generation"])

    def forget_worker(self, worker_id: str, reason: str) -> int:
        raise _not_here("forgetting a worker")

    def reap(self) -> int:
        raise _not_here("reaping expired leases (the server's store does it as workers lease)")

    # -- submission -------------------------------------------------------------------------
    def submit(self, run: NewRun, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None) -> str:
        specs = [j.to_json() for j in jobs]
        if not specs:
            raise StoreError("nothing to submit: the run has no jobs")
        chosen = run if run.id else NewRun(run.name, run.source, run.workdir,
                                           secrets.token_hex(4))  # a retry finds it
        got = self._s.json("POST", "/v1/client/runs", json={
            "run": wire.record_json(chosen), "jobs": specs,
            "payloads": None if payloads is None else [wire.b64(p) for p in payloads]})
        return str(got["run"])

    def append(self, run_id: str, jobs: Iterable[JobSpec],
               payloads: Iterable[bytes] | None = None, request: str | None = None) -> int:
        # the same id goes with every try, so a try after a lost answer is done only once
        got = self._s.json("POST", f"/v1/client/runs/{run_id}/jobs", json={
            "jobs": [j.to_json() for j in jobs], "request": request or secrets.token_hex(8),
            "payloads": None if payloads is None else [wire.b64(p) for p in payloads]})
        return int(got["first"])

    # -- the user's side --------------------------------------------------------------------
    def _get(self, path: str, **params: Any) -> Any:
        return self._s.json("GET", f"/v1/client/{path}",
                            params={k: v for k, v in params.items() if v is not None})

    def run(self, ref: str) -> Run:
        try:
            return super().run(ref)
        except NotFound as e:
            raise NotFound(e.message, hint="through a server, a client token sees only the runs"
                                           " it submitted (and an admin token every run);"
                                           " `jobfleet runs` lists them") from None

    def runs(self, limit: int = 50) -> list[Run]:
        return [wire.run_of(r) for r in self._get("runs", limit=limit)["runs"]]

    def _runs_by_prefix(self, prefix: str) -> list[Run]:
        return [wire.run_of(r) for r in self._get("runs", prefix=prefix, limit=2)["runs"]]

    def pending(self, run_id: str) -> int | None:
        n = self._get(f"runs/{run_id}/pending")["pending"]
        return None if n is None else int(n)

    def counts(self, run_id: str) -> dict[str, int]:
        return dict(self._get(f"runs/{run_id}/counts")["counts"])

    def jobs(self, run_id: str, state: str | None = None, limit: int | None = None) -> list[Job]:
        return [wire.job_of(j) for j in self._get(f"runs/{run_id}/jobs", state=state,
                                                  limit=limit)["jobs"]]

    def _job_at(self, run_id: str, seq: int) -> Job | None:
        found = self._get(f"runs/{run_id}/jobs/{seq}")["job"]
        return None if found is None else wire.job_of(found)

    def ended(self, run_id: str, since: float = 0.0, results: bool = True) -> list[Ended]:
        return [wire.ended_of(e) for e in self._get(
            f"runs/{run_id}/ended", since=since, results=results)["ended"]]

    def clear_results(self, run_id: str) -> int:
        return int(self._s.json("POST", f"/v1/client/runs/{run_id}/clear_results")["cleared"])

    def attempts(self, job_key: int) -> list[Attempt]:
        return [wire.attempt_of(a) for a in self._get(f"jobs/{job_key}/attempts")["attempts"]]

    def events(self, run_id: str | None = None, job_key: int | None = None) -> list[Event]:
        return [wire.event_of(e) for e in self._get("events", run=run_id, job=job_key)["events"]]

    def workers(self) -> list[WorkerInfo]:
        return [wire.worker_of(w) for w in self._get("workers")["workers"]]

    def retry(self, run_id: str, job_key: int | None = None) -> int:
        return int(self._s.json("POST", f"/v1/client/runs/{run_id}/retry",
                                json={"job": job_key})["queued"])

    def cancel(self, run_id: str, job_key: int | None = None) -> tuple[int, int]:
        got = self._s.json("POST", f"/v1/client/runs/{run_id}/cancel", json={"job": job_key})
        return int(got["cancelled"]), int(got["asked"])

    def usage(self, run_id: str) -> list[Usage]:
        return [Usage(**u) for u in self._get(f"runs/{run_id}/usage")["usage"]]

    def add_usage(self, run_id: str, instance_type: str, worker_seconds: float,
                  cost: float) -> None:
        raise _not_here("recording a fleet's usage")

    def stop_run(self, run_id: str, reason: str | None) -> None:
        raise _not_here("stopping a run for a cap")

    def _rows(self, sql: str, run_id: str | None) -> list[tuple[Any, ...]]:
        raise _not_here("sizing a fleet from the queue (run the controller beside the store)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._s.close()
        for fd in (self._ready_r, self._ready_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _not_here(what: str) -> StoreError:
    return StoreError(f"{what} is not done through a jobfleet server",
                      hint="run that command where the store is, with --store pointing at it")


def _poke(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"x")


def _sleep(timeout: float, also: int | None) -> None:
    poller = select.poll()
    if also is not None:
        poller.register(also, select.POLLIN)
    poller.poll(max(0, round(timeout * 1000)))
