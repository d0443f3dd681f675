"""The store: where runs, jobs, attempts, workers and events live; chosen by URL."""

from __future__ import annotations

from pathlib import Path

from jobfleet.errors import ConfigError
from jobfleet.store.base import (
    STATES,
    TERMINAL,
    UNSTARTED,
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
    job_id,
)

__all__ = [
    "STATES", "TERMINAL", "UNSTARTED", "Attempt", "Beat", "Capacity", "Ended", "Event", "Job",
    "Lease", "NewRun", "Outcome", "Run", "Store", "WorkerInfo", "job_id", "open_store",
]


def open_store(url: str | Path) -> Store:
    """Open the store at `url`: a SQLite path (`sqlite:///abs.db`, `sqlite://rel.db`, or a bare path)."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = ("sqlite", text[len("sqlite:"):]) if text.startswith("sqlite:") else ("", text)
    if scheme in ("", "sqlite", "file"):
        from jobfleet.store.sqlite import SQLiteStore

        return SQLiteStore(rest)
    if scheme in ("postgresql", "postgres"):
        raise ConfigError(
            f"the PostgreSQL store is not built yet: {text}",
            hint="use the embedded SQLite store (the default) for now",
        )
    raise ConfigError(
        f"unknown store URL scheme '{scheme}' in {text}",
        hint="use a SQLite path such as .jobfleet/jobfleet.db or sqlite:///abs/path.db",
    )
