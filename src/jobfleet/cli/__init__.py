"""The `jobfleet` command line."""

from __future__ import annotations

import sys

from rich.markup import escape

from jobfleet.cli.app import app, err
from jobfleet.errors import JobfleetError

# imported for the commands they register, in the order `jobfleet --help` lists them
from jobfleet.cli import run  # noqa: E402, F401, I001
from jobfleet.cli import inspect  # noqa: E402, F401
from jobfleet.cli import control  # noqa: E402, F401

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except JobfleetError as e:
        err.print(f"[red]error:[/] {escape(e.message)}")
        if e.hint:
            err.print(f"  → {escape(e.hint)}")
        sys.exit(e.exit_code)
