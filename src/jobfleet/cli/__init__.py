"""The `jobfleet` command line."""

from __future__ import annotations

import sys

from rich.markup import escape

from jobfleet.cli.app import app, err
from jobfleet.errors import JobfleetError

# imported for the commands they register, in the order `jobfleet --help` lists them
# isort: off
from jobfleet.cli import run  # noqa: F401
from jobfleet.cli import inspect  # noqa: F401
from jobfleet.cli import explain  # noqa: F401
from jobfleet.cli import results  # noqa: F401
from jobfleet.cli import control  # noqa: F401
from jobfleet.cli import fleet  # noqa: F401
from jobfleet.cli import cost  # noqa: F401
from jobfleet.cli import dashboard  # noqa: F401
from jobfleet.cli import gateway  # noqa: F401
from jobfleet.cli import sandboxing  # noqa: F401
from jobfleet.cli import validate  # noqa: F401
from jobfleet.cli import doctor  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except JobfleetError as e:
        err.print(f"[red]error:[/] {escape(e.message)}")
        if e.hint:
            err.print(f"  → {escape(e.hint)}")
        sys.exit(e.exit_code)
