"""The `jobfleet` command line."""

from __future__ import annotations

import sys

from rich.markup import escape

from jobfleet.cli import control, inspect, run  # noqa: F401  (they register the commands)
from jobfleet.cli.app import app, err
from jobfleet.errors import JobfleetError

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except JobfleetError as e:
        err.print(f"[red]error:[/] {escape(e.message)}")
        if e.hint:
            err.print(f"  → {escape(e.hint)}")
        sys.exit(e.exit_code)
