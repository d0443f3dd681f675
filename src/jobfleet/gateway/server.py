"""`jobfleet server`: the dashboard grown into the control plane. Workers and clients speak to
it (under /v1) with a token; only the server holds the store's and blob store's credentials.

`create_server` builds the app: the gateway's routes, and the dashboard (pages, /api,
/metrics) mounted beside them. One thread hears of new work for every waiting worker (see
`WorkAnnouncer`), so an idle fleet costs the store one listener, not one per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from jobfleet.blobs import open_blobs
from jobfleet.dashboard.access import StorePerThread
from jobfleet.errors import JobfleetError
from jobfleet.gateway.access import BadRequest, Gate, Refused
from jobfleet.gateway.db import gateway_db
from jobfleet.gateway.worker_api import WorkerAPI, error_answer
from jobfleet.store import Store, open_store


class WorkAnnouncer:
    """Counts the news of work the store hears (a submit, a retry, a job back in the queue);
    waiting requests return as soon as the count moves past what they saw."""

    def __init__(self, opener: Callable[[], Store]) -> None:
        # where this server's count starts: a worker that heard an earlier server's count is
        # told news at once, not when the counts happen to meet
        self.generation = secrets.randbelow(2**31)
        self._waiting = 0  # requests waiting now (changed in the event loop's thread only)
        self._open = opener
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._listen, name="jobfleet-announcer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _listen(self) -> None:
        store: Store | None = None
        while not self._stopping:
            try:
                if store is None:
                    store = self._open()
                    store.wait_for_work(0)  # starts listening
                    self._bump()  # work may have come while nobody listened
                    continue
                started = time.monotonic()
                store.wait_for_work(5.0, also=self._stop_r)
                if not store.hears_work:
                    time.sleep(0.2)  # a store that cannot tell: news every poll
                    self._bump()
                elif time.monotonic() - started < 4.9 and not self._stopping:
                    self._bump()
                    time.sleep(0.002)  # a burst of writes (SQLite: each commit) is one bump
            except Exception:  # noqa: BLE001  (the store is away: try again in a moment)
                if store is not None:
                    with contextlib.suppress(Exception):
                        store.close()
                store = None
                time.sleep(1.0)
        if store is not None:
            store.close()

    def _bump(self) -> None:
        self.generation += 1
        loop = self._loop
        if loop is not None and self._waiting:  # no one waits while workers are busy
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()

    def release(self) -> None:
        """The server is stopping: every wait returns now (so that it can stop at once)."""
        self._stopping = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fire)

    async def wait(self, since: int, timeout: float) -> int:
        """The news count, once it is not `since` or `timeout` seconds have passed."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._event is None:
            self._event = asyncio.Event()
        self._waiting += 1  # before looking: a bump now either is seen or wakes us
        try:
            if self.generation == since and timeout > 0 and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), timeout)
        finally:
            self._waiting -= 1
        return self.generation

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(timeout=10)


def create_server(store_url: str, blobs_url: str, *, opener: Callable[[str], Store] | None = None,
                  dashboard: bool = True, dashboard_token: str | None = None,
                  protect_reads: bool = True) -> WorkerAPI:
    """The server for the store at `store_url` and the blobs at `blobs_url`.

    `opener` opens the store (default `open_store`; tests pass one with their clock). With
    `dashboard`, the dashboard's pages and API are served too, behind `dashboard_token`.
    Returns the ASGI app: the worker's routes (worker_api.py) in front of a FastAPI app (its
    `.app`) with the client's and the blobs' routes and the dashboard.
    """
    from jobfleet.gateway import routes

    open_one = opener or open_store
    stores = StorePerThread(store_url, open_one)
    first = stores.get()
    db = gateway_db(first)
    announcer = WorkAnnouncer(lambda: open_one(store_url))
    gate = Gate(stores, open_blobs(blobs_url), db, announcer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        announcer.start()
        try:
            yield
        finally:
            announcer.stop()
            stores.close()
            db.close()
            if sub is not None:
                sub.state.jobfleet.stores.close()

    app = FastAPI(title="jobfleet server",
                  summary="The worker gateway (/v1) and the dashboard of one jobfleet store.",
                  lifespan=lifespan)
    app.state.gate = gate
    app.include_router(routes.client)
    app.include_router(routes.blobs)

    @app.exception_handler(Refused)
    @app.exception_handler(BadRequest)
    @app.exception_handler(JobfleetError)
    @app.exception_handler(KeyError)
    @app.exception_handler(TypeError)
    @app.exception_handler(ValueError)
    async def refused(request: Request, e: Exception) -> JSONResponse:
        status, body = error_answer(e)
        return JSONResponse(body, status_code=status)

    sub: Any = None
    if dashboard:
        from jobfleet.dashboard.app import create_app

        sub = create_app(store_url, blobs_url, dashboard_token, protect_reads=protect_reads)
        app.mount("/", sub)
    return WorkerAPI(app, gate)


def serve(app: WorkerAPI, **config: Any) -> None:
    """Serve `app` with uvicorn until SIGTERM or SIGINT; workers waiting for work are let go
    at once, so the server stops within moments (they come back to the new one)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.release()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, **config)).run()
