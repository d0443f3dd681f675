"""The dashboard's pages: runs, one run's jobs, one job with its log, workers.

Each page has a fragment (`/fragments/...`) holding its changing part; the page's script
fetches it again every second or two and swaps it in, so a page follows its run live.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from jobfleet.cli.fmt import ago, duration, iso, size
from jobfleet.dashboard.context import Context, context
from jobfleet.dashboard.views import (
    RunViews,
    fleet,
    job_view,
    read_log,
    worker_views,
)
from jobfleet.store import STALLED, STATES, Store, state_filter

Ctx = Annotated[Context, Depends(context)]
#: jobs listed on a run's page (the JSON API pages through any number)
JOBS_SHOWN = 500
#: runs listed on the front page
RUNS_SHOWN = 50

router = APIRouter(include_in_schema=False)


def setup_templates(templates: Jinja2Templates, ctx: Context) -> None:
    """Filters and globals the templates use."""
    env = templates.env
    env.filters.update(ago=ago, duration=duration, size=size, iso=iso, rate=_rate)
    env.globals.update(STATES=STATES, store_url=ctx.stores.url)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} jobs/s" if value < 10 else f"{value:.0f} jobs/s"


def render(request: Request, name: str, status: int = 200, **data: Any) -> HTMLResponse:
    """A page or fragment; pages get the token when this browser already holds it."""
    ctx: Context = request.app.state.jobfleet
    templates: Jinja2Templates = request.app.state.templates
    has_token = getattr(request.state, "has_token", False)
    data.update(token=ctx.token.value if has_token else None, can_act=has_token)
    return templates.TemplateResponse(request, name, data, status_code=status,
                                      headers={"Cache-Control": "no-store"})


def error_page(request: Request, status: int, message: str, hint: str | None) -> HTMLResponse:
    return render(request, "error.html", status, message=message, hint=hint)


def _db(ctx: Context) -> Store:
    return ctx.stores.get()


# -- runs -------------------------------------------------------------------------------------
def _runs(request: Request, ctx: Context, name: str) -> HTMLResponse:
    views: RunViews = ctx.run_views
    return render(request, name, runs=views.all(_db(ctx), RUNS_SHOWN))


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, ctx: Ctx) -> HTMLResponse:
    return _runs(request, ctx, "runs.html")


@router.get("/fragments/runs", response_class=HTMLResponse)
def runs_fragment(request: Request, ctx: Ctx) -> HTMLResponse:
    return _runs(request, ctx, "_runs.html")


# -- one run ----------------------------------------------------------------------------------
def _run(request: Request, ctx: Context, ref: str, state: str | None, name: str) -> HTMLResponse:
    state = state_filter(state)
    db = _db(ctx)
    view = ctx.run_views.view(db, db.run(ref))
    jobs = db.jobs(view.run.id, state, JOBS_SHOWN)
    stalled = len(db.jobs(view.run.id, STALLED)) if view.counts["running"] else 0
    shown_of = (stalled if state == STALLED else view.counts[state]) if state else view.run.total
    return render(request, name, v=view, jobs=jobs, state=state, shown_of=shown_of,
                  stalled=stalled)


StateQuery = Annotated[str | None, Query(description="only jobs in this state")]


@router.get("/runs/{ref}", response_class=HTMLResponse)
def run_page(request: Request, ctx: Ctx, ref: str, state: StateQuery = None) -> HTMLResponse:
    return _run(request, ctx, ref, state, "run.html")


@router.get("/fragments/runs/{ref}", response_class=HTMLResponse)
def run_fragment(request: Request, ctx: Ctx, ref: str, state: StateQuery = None) -> HTMLResponse:
    return _run(request, ctx, ref, state, "_run.html")


# -- one job ----------------------------------------------------------------------------------
@router.get("/jobs/{ref}", response_class=HTMLResponse)
def job_page(request: Request, ctx: Ctx, ref: str) -> HTMLResponse:
    db = _db(ctx)
    view = job_view(db, ref)
    log = read_log(db, ctx.blobs, view.job.id, tail=True)  # a long log: its end
    return render(request, "job.html", v=view, log=log)


@router.get("/fragments/jobs/{ref}", response_class=HTMLResponse)
def job_fragment(request: Request, ctx: Ctx, ref: str) -> HTMLResponse:
    return render(request, "_job.html", v=job_view(_db(ctx), ref))


# -- workers ----------------------------------------------------------------------------------
def _workers(request: Request, ctx: Context, name: str) -> HTMLResponse:
    workers = worker_views(_db(ctx))
    return render(request, name, workers=workers, hosts=fleet(workers))


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request, ctx: Ctx) -> HTMLResponse:
    return _workers(request, ctx, "workers.html")


@router.get("/fragments/workers", response_class=HTMLResponse)
def workers_fragment(request: Request, ctx: Ctx) -> HTMLResponse:
    return _workers(request, ctx, "_workers.html")
