"""The store: where runs, jobs, attempts, workers and events live; chosen by URL."""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

from jobfleet.errors import ConfigError
from jobfleet.store.base import (
    STALLED,
    STATES,
    TERMINAL,
    UNSTARTED,
    Attempt,
    Beat,
    Capacity,
    Demand,
    Ended,
    Event,
    Job,
    Lease,
    NewRun,
    Outcome,
    Run,
    Store,
    Usage,
    WorkerInfo,
    job_id,
    state_filter,
)
from jobfleet.store.urls import masked

__all__ = [
    "STALLED", "STATES", "TERMINAL", "UNSTARTED", "Attempt", "Beat", "Capacity", "Demand",
    "Ended", "Event", "Job", "Lease", "NewRun", "Outcome", "Run", "Store", "Usage", "WorkerInfo", "job_id",
    "close_all", "open_store", "state_filter",
]

#: the stores open_store opened that may still be open (see close_all)
_opened: weakref.WeakSet[Store] = weakref.WeakSet()


def open_store(url: str | Path) -> Store:
    """Open the store at `url`: a SQLite path (`sqlite:///abs.db`, `sqlite://rel.db`, or a bare
    path), a PostgreSQL database (`postgresql://user@host:port/db`, also `postgres://`), or a
    `jobfleet server` (`https://host:port`, see jobfleet.gateway)."""
    store = _open(url)
    _opened.add(store)
    return store


def close_all() -> None:
    """Close every store open_store opened that is still referenced (closing twice is
    harmless): for a process about to end without the interpreter's own cleanup."""
    for store in list(_opened):
        with contextlib.suppress(Exception):
            store.close()


def _open(url: str | Path) -> Store:
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = ("sqlite", text[len("sqlite:"):]) if text.startswith("sqlite:") else ("", text)
    if scheme in ("", "sqlite", "file"):
        from jobfleet.store.sqlite import SQLiteStore

        return SQLiteStore(rest)
    if scheme in ("postgresql", "postgres"):
        from jobfleet.store.postgres import PostgresStore

        return PostgresStore(text)
    if scheme in ("https", "http"):  # a `jobfleet server`, with the token JOBFLEET_TOKEN_FILE names
        from jobfleet.gateway import connect

        return connect(text)[0]
    raise ConfigError(
        f"unknown store URL scheme '{scheme}' in {masked(text)}",
        hint="use a SQLite path such as .jobfleet/jobfleet.db or sqlite:///abs/path.db,"
             " or a PostgreSQL URL such as postgresql://user@host:5432/db",
    )

