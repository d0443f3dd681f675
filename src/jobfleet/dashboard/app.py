"""The dashboard's FastAPI app: pages, the JSON API, /metrics, and who may use them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from jobfleet.blobs import open_blobs
from jobfleet.dashboard import api, pages
from jobfleet.dashboard.access import TOKEN_PARAM, StorePerThread, Token, is_loopback, new_token
from jobfleet.dashboard.context import Context
from jobfleet.dashboard.metrics import Metrics
from jobfleet.dashboard.views import RunViews
from jobfleet.errors import ConfigError, JobfleetError, NotFound, SpecError
from jobfleet.store import open_store

HERE = Path(__file__).parent
#: paths answered whoever asks: the script and the style sheet hold no data
PUBLIC_PREFIX = "/static/"


def create_app(store_url: str, blobs_url: str, token: str | None = None, *,
               protect_reads: bool = False) -> FastAPI:
    """The dashboard for the store at `store_url` and the blob store at `blobs_url`.

    `token` authorizes actions (retry, cancel); without one a random one is made (see
    `app.state.jobfleet.token`). With `protect_reads` every page and API call needs it too,
    as when the dashboard listens on more than loopback.
    """
    ctx = Context(
        stores=StorePerThread(store_url, open_store),
        blobs=open_blobs(blobs_url),
        token=Token(token or new_token(), protect_reads=protect_reads),
        run_views=RunViews(),
        metrics=Metrics(),
    )
    ctx.stores.get()  # open it once now: a bad URL fails here, not at the first page
    ctx.stores.close()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.stores.close()

    app = FastAPI(
        title="jobfleet dashboard",
        summary="Runs, jobs, logs and workers of one jobfleet store.",
        description="Reading needs no token on loopback. Actions (retry, cancel) always need "
                    "the dashboard token, sent as `X-Jobfleet-Token: TOKEN` or "
                    "`Authorization: Bearer TOKEN`.",
        lifespan=lifespan,
    )
    app.state.jobfleet = ctx
    templates = Jinja2Templates(directory=HERE / "templates")
    pages.setup_templates(templates, ctx)
    app.state.templates = templates

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(api.actions)
    app.include_router(pages.router)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["metrics"],
             summary="Prometheus metrics")
    def metrics() -> PlainTextResponse:
        """Jobs by state, throughput, job duration and queue wait histograms, workers alive,
        lease expiries and retries, in Prometheus' text exposition format."""
        return PlainTextResponse(ctx.metrics.render(ctx.stores.get()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.middleware("http")
    async def guard(request: Request,
                    call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        return await _guard(ctx.token, request, call_next)

    @app.exception_handler(JobfleetError)
    async def jobfleet_error(request: Request, e: JobfleetError) -> Response:
        status = 404 if isinstance(e, NotFound) else 400 if isinstance(
            e, SpecError | ConfigError) else 500
        if _is_api(request):
            return JSONResponse({"detail": e.message, "hint": e.hint}, status_code=status)
        return pages.error_page(request, status, e.message, e.hint)

    return app


def _is_api(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path in ("/metrics", "/openapi.json")


async def _guard(token: Token, request: Request,
                 call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Hand a browser the token (from `?token=`) as a cookie, and keep out readers without it
    when reads are protected."""
    if request.url.path.startswith(PUBLIC_PREFIX):
        return await call_next(request)
    cookie = Token.cookie_name(request.url.port)
    given = request.query_params.get(TOKEN_PARAM)
    if given is not None:
        if not token.matches(given):
            return _refuse(request, "the token in this URL is not this dashboard's token")
        if not _is_api(request) and request.method == "GET":
            # a page: keep the token in a cookie and take it out of the address bar
            response = RedirectResponse(str(request.url.remove_query_params(TOKEN_PARAM)), 303)
            response.set_cookie(cookie, token.value, httponly=True, samesite="lax", path="/")
            return response
    has_token = given is not None or token.matches(request.cookies.get(cookie)) \
        or token.matches(Token.from_headers(request.headers))
    request.state.has_token = has_token
    if token.protect_reads and not has_token:
        return _refuse(request, "this dashboard needs its token")
    if not has_token and not is_loopback(request.url.hostname or ""):
        # open reading is for this machine's browsers: a page of another site that has made
        # its own name point here (DNS rebinding) must not read the jobs
        return _refuse(request, f"this dashboard answers at 127.0.0.1 or localhost, not at"
                                f" {request.url.hostname}, unless given its token")
    return await call_next(request)


def _refuse(request: Request, why: str) -> Response:
    hint = ("open the URL with ?token=TOKEN once (TOKEN is JOBFLEET_DASHBOARD_TOKEN), or send "
            "'X-Jobfleet-Token: TOKEN' or 'Authorization: Bearer TOKEN'")
    if _is_api(request):
        return JSONResponse({"detail": why, "hint": hint}, status_code=401)
    return pages.error_page(request, 401, why, hint)
