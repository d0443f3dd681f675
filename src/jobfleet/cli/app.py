"""The typer app, the options every command shares, and how errors reach the terminal."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobfleet.blobs import Blobs, open_blobs
from jobfleet.config import Settings, load_settings
from jobfleet.store import Store, open_store

if TYPE_CHECKING:
    from rich.console import Console

    from jobfleet.worker import WorkerOptions

app = typer.Typer(
    name="jobfleet",
    help="Run many jobs - shell commands from a job file - on a fleet of workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from jobfleet import __version__

        print(f"jobfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print jobfleet's version and exit.")
    ] = False,
) -> None:
    # Options of jobfleet itself. Having them also keeps `jobfleet CMD` a command group when
    # only CMD's module is loaded (see jobfleet.cli.load_commands).
    pass


class LazyConsole:
    """A rich Console, made on first use: rich takes tens of milliseconds to import, and
    `jobfleet run` starts its first jobs before it prints anything (its progress thread
    prints, importing rich while the jobs run). Attributes are the Console's."""

    _lock = threading.Lock()

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The Console itself (for rich objects that take one)."""
        if self._console is None:
            with self._lock:
                if self._console is None:
                    from rich.console import Console

                    self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


# soft wrap: a long line (a command to copy) stays one line
out = LazyConsole(highlight=False, soft_wrap=True)
err = LazyConsole(stderr=True, highlight=False, soft_wrap=True)

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
