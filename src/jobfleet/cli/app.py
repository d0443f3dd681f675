"""The typer app, the options every command shares, and how errors reach the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from jobfleet.blobs import Blobs, open_blobs
from jobfleet.config import Settings, load_settings
from jobfleet.store import Store, open_store

if TYPE_CHECKING:
    from jobfleet.worker import WorkerOptions

app = typer.Typer(
    name="jobfleet",
    help="Run many jobs - shell commands from a job file - on a fleet of workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft wrap: a long line (a command to copy) stays one line
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", metavar="URL",
                 help="Store URL or SQLite path (env JOBFLEET_STORE; default .jobfleet/jobfleet.db)"),
]
BlobsOpt = Annotated[
    str | None,
    typer.Option("--blobs", metavar="URL",
                 help="Blob store folder or URL (env JOBFLEET_BLOBS; default .jobfleet/blobs)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (schema: docs/cli.md).")]


def settings(store: str | None = None, blobs: str | None = None, **flags: object) -> Settings:
    return load_settings({"store": store, "blobs": blobs, **flags})


def worker_options(s: Settings, **decided: Any) -> WorkerOptions:
    """A worker's options: what the settings say, plus what the command decides itself."""
    from jobfleet.worker import WorkerOptions

    return WorkerOptions(slots=s.slots, lease_seconds=s.lease_seconds,
                         drain_seconds=s.drain_seconds, kill_grace=s.kill_grace, **decided)


def connect(s: Settings) -> tuple[Store, Blobs]:
    db = open_store(s.store)
    paired: Blobs | None = getattr(db, "blobs", None)  # a `jobfleet server`'s own blob store
    return db, paired or open_blobs(s.blobs)


def connect_store(s: Settings) -> Store:
    """The store alone, for commands that read no blobs (a remote blob store costs a request)."""
    return open_store(s.store)
