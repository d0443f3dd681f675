"""The `jobfleet` command line.

A command's module is imported only when that command runs (all of them for `--help` or an
unknown name): `jobfleet run` starts its first job sooner for not loading `doctor` or the
dashboard. And once the program's command is done, the process ends at once, without the
interpreter's module-by-module cleanup (about 50 ms here), after flushing its output and
closing its stores (`program`; `main` can be called in a process that goes on).
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading

from jobfleet.cli.app import app, err
from jobfleet.errors import JobfleetError

#: the modules that register the commands, in the order `jobfleet --help` lists them, with
#: the names they register (tests/test_cli.py checks this against what they do register)
COMMANDS = {
    "run": ("submit", "run"),
    "inspect": ("runs", "status", "jobs", "logs", "events", "workers"),
    "explain": ("explain",),
    "results": ("results",),
    "control": ("retry", "cancel", "worker"),
    "fleet": ("fleet",),
    "cost": ("cost",),
    "dashboard": ("dashboard",),
    "gateway": ("token", "server"),
    "sandboxing": ("test",),
    "validate": ("validate",),
    "doctor": ("doctor",),
}

__all__ = ["COMMANDS", "app", "load_commands", "main", "program"]


def load_commands(argv: list[str] | None = None) -> None:
    """Import the module of the command `argv` names, or every command module."""
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    modules = [m for m, names in COMMANDS.items() if first in names] or list(COMMANDS)
    for module in modules:
        importlib.import_module(f"jobfleet.cli.{module}")


def main() -> None:
    """`jobfleet` with sys.argv; raises SystemExit with its exit status."""
    load_commands(sys.argv[1:])
    try:
        app()
    except JobfleetError as e:
        from jobfleet.cli.fmt import escape

        err.print(f"[red]error:[/] {escape(e.message)}")
        if e.hint:
            err.print(f"  → {escape(e.hint)}")
        sys.exit(e.exit_code)


def program() -> None:
    """The `jobfleet` program (the console script, `python -m jobfleet`): main, then the
    process ends at once (see _exit)."""
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            _exit(e.code or 0)
        raise
    _exit(0)


def _exit(code: int) -> None:
    """End the process now: run the exit handlers (an ssh fleet's `close` lets the bootstraps
    it started finish), close the stores, flush, and skip the rest of the interpreter's
    cleanup. When another (non-daemon) thread still runs, exit the usual way, which waits
    for it."""
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter would run first on a normal exit
    from jobfleet.store import close_all

    close_all()
    if "logging" in sys.modules:
        import logging

        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`jobfleet runs | head`)
            if code == 0:
                code = 1
    os._exit(code)
