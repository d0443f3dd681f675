"""The JSON API under /api: runs, a run's jobs, a job with its attempts, events and log, workers;
and the actions (retry, cancel), which take the dashboard's token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel

from jobfleet.cli.fmt import iso, job_json
from jobfleet.dashboard.access import TOKEN_HEADER, Token
from jobfleet.dashboard.context import Context, context
from jobfleet.dashboard.views import RunView, job_view, read_log, worker_views
from jobfleet.store import Attempt, Event, Store, state_filter

Ctx = Annotated[Context, Depends(context)]


def _store(ctx: Ctx) -> Store:
    return ctx.stores.get()


Db = Annotated[Store, Depends(_store)]


def require_token(request: Request, ctx: Ctx) -> None:
    """Actions change the queue: they need the token in a header, whatever the bind address."""
    if not ctx.token.matches(Token.from_headers(request.headers)):
        raise HTTPException(
            status_code=401,
            detail=f"this action needs the dashboard token: send it as '{TOKEN_HEADER}: TOKEN'"
                   " or 'Authorization: Bearer TOKEN' (the token is JOBFLEET_DASHBOARD_TOKEN, or"
                   " the one `jobfleet dashboard` printed)")


router = APIRouter(prefix="/api", tags=["api"])
actions = APIRouter(prefix="/api", tags=["actions"], dependencies=[Depends(require_token)])


# -- response models (the same fields as the CLI's --json) ------------------------------------
class RunOut(BaseModel):
    run: str
    name: str | None
    source: str | None
    workdir: str | None
    created_at: str | None
    total: int
    state: str
    counts: dict[str, int]
    done: int
    rate: float | None
    eta_seconds: float | None


class JobOut(BaseModel):
    job: str
    run: str
    seq: int
    name: str | None
    state: str
    attempts: int
    max_attempts: int
    exit_code: int | None
    signal: int | None
    reason: str | None
    started_at: str | None
    finished_at: str | None
    worker: str | None
    peak_rss: int | None
    stalled_since: str | None = None  # running, with no output and no CPU use since then
    command: str | None


class AttemptOut(BaseModel):
    number: int
    state: str
    worker: str | None
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    signal: int | None
    reason: str | None
    peak_rss: int | None


class EventOut(BaseModel):
    at: str | None
    kind: str
    worker: str | None
    detail: dict[str, Any]


class JobDetailOut(JobOut):
    attempt_list: list[AttemptOut]
    events: list[EventOut]


class WorkerOut(BaseModel):
    worker: str
    host: str
    pid: int
    run: str | None
    state: str
    slots: int
    cpus: float
    memory: int
    gpus: int
    jobs_done: int
    started_at: str | None
    heartbeat_at: str | None
    heartbeat_age: float
    jobs: list[str]


class ActionOut(BaseModel):
    run: str
    job: str | None
    queued: int = 0
    cancelled: int = 0
    asked_to_stop: int = 0
    message: str


def run_out(v: RunView) -> RunOut:
    r = v.run
    return RunOut(run=r.id, name=r.name, source=r.source, workdir=r.workdir,
                  created_at=iso(r.created_at), total=r.total, state=v.state, counts=v.counts,
                  done=v.done, rate=v.rate, eta_seconds=v.eta)


def attempt_out(a: Attempt) -> AttemptOut:
    return AttemptOut(number=a.number, state=a.state, worker=a.worker_id,
                      started_at=iso(a.started_at), finished_at=iso(a.finished_at),
                      exit_code=a.exit_code, signal=a.signal, reason=a.reason,
                      peak_rss=a.peak_rss)


def event_out(e: Event) -> EventOut:
    return EventOut(at=iso(e.at), kind=e.kind, worker=e.worker_id, detail=e.detail)


# -- reading ----------------------------------------------------------------------------------
@router.get("/runs", response_model=list[RunOut], summary="Runs, newest first")
def api_runs(ctx: Ctx, db: Db, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[RunOut]:
    return [run_out(v) for v in ctx.run_views.all(db, limit)]


@router.get("/runs/{run}", response_model=RunOut, summary="One run: counts, progress, rate")
def api_run(run: str, ctx: Ctx, db: Db) -> RunOut:
    """`run` is an id, a unique prefix of one, or `latest`."""
    return run_out(ctx.run_views.view(db, db.run(run)))


@router.get("/runs/{run}/jobs", response_model=list[JobOut], summary="A run's jobs")
def api_jobs(run: str, db: Db, state: str | None = None,
             limit: Annotated[int | None, Query(ge=1)] = None) -> list[JobOut]:
    """Jobs in file order; `state` keeps only jobs in that state."""
    return [JobOut(**job_json(j)) for j in db.jobs(db.run(run).id, state_filter(state), limit)]


@router.get("/jobs/{job}", response_model=JobDetailOut,
            summary="One job with its attempts and events")
def api_job(job: str, db: Db) -> JobDetailOut:
    """`job` is `RUN-N` (RUN may be a unique prefix)."""
    v = job_view(db, job)
    return JobDetailOut(**job_json(v.job), attempt_list=[attempt_out(a) for a in v.attempts],
                        events=[event_out(e) for e in v.events])


@router.get("/jobs/{job}/log", response_class=Response, summary="A job's log text",
            responses={200: {"content": {"text/plain": {}},
                              "description": "The log from `offset`. Headers: X-Attempt (which "
                              "attempt), X-Next-Offset (where to read on), X-Log-Complete "
                              "(1 once the attempt has ended and everything is read), "
                              "X-Log-More (1: more can be read at once), X-Job-State."}})
def api_log(job: str, ctx: Ctx, db: Db,
            attempt: Annotated[int | None, Query(ge=1, description="default: the latest")] = None,
            offset: Annotated[int, Query(ge=0)] = 0) -> Response:
    """Follow a running job by asking again from X-Next-Offset until X-Log-Complete is 1."""
    page = read_log(db, ctx.blobs, job, attempt, offset)
    return Response(page.text, media_type="text/plain; charset=utf-8", headers={
        "X-Attempt": str(page.attempt), "X-Next-Offset": str(page.next_offset),
        "X-Log-Complete": "1" if page.complete else "0", "X-Log-More": "1" if page.more else "0",
        "X-Job-State": page.job_state,
        "Cache-Control": "no-store"})


@router.get("/workers", response_model=list[WorkerOut], summary="Workers and their current jobs")
def api_workers(db: Db) -> list[WorkerOut]:
    """State is `silent` once a worker's heartbeats stopped arriving within its lease."""
    return [WorkerOut(
        worker=w.info.id, host=w.info.host, pid=w.info.pid, run=w.info.run_id, state=w.state,
        slots=w.info.slots, cpus=w.info.cpus, memory=w.info.memory, gpus=w.info.gpus,
        jobs_done=w.info.jobs_done, started_at=iso(w.info.started_at),
        heartbeat_at=iso(w.info.heartbeat_at), heartbeat_age=round(w.heartbeat_age, 3),
        jobs=w.jobs) for w in worker_views(db)]


# -- actions ----------------------------------------------------------------------------------
def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


@actions.post("/jobs/{job}/retry", response_model=ActionOut,
              summary="Queue a failed or cancelled job again")
def api_retry_job(job: str, db: Db) -> ActionOut:
    j = db.job(job)
    n = db.retry(j.run_id, j.key)
    return ActionOut(run=j.run_id, job=j.id, queued=n,
                     message=f"job {j.id} queued again" if n else
                     f"job {j.id} is {j.state}: only failed or cancelled jobs can be retried")


@actions.post("/runs/{run}/retry", response_model=ActionOut,
              summary="Queue a run's failed jobs again")
def api_retry_run(run: str, db: Db) -> ActionOut:
    run_id = db.run(run).id
    n = db.retry(run_id)
    return ActionOut(run=run_id, job=None, queued=n,
                     message=f"{_plural(n, 'failed job')} of run {run_id} queued again")


@actions.post("/jobs/{job}/cancel", response_model=ActionOut, summary="Cancel one job")
def api_cancel_job(job: str, db: Db) -> ActionOut:
    j = db.job(job)
    done, asked = db.cancel(j.run_id, j.key)
    return ActionOut(run=j.run_id, job=j.id, cancelled=done, asked_to_stop=asked,
                     message=f"job {j.id}: " + ("cancelled" if done else "its worker was asked"
                                                " to stop it" if asked else "nothing to cancel"))


@actions.post("/runs/{run}/cancel", response_model=ActionOut,
              summary="Cancel a run's queued jobs and stop its running ones")
def api_cancel_run(run: str, db: Db) -> ActionOut:
    run_id = db.run(run).id
    done, asked = db.cancel(run_id)
    return ActionOut(run=run_id, job=None, cancelled=done, asked_to_stop=asked,
                     message=f"run {run_id}: cancelled {_plural(done, 'queued job')},"
                             f" asked workers to stop {asked} running")
