"""PostgreSQL for the tests: the shared server (a skip on a laptop without one, a failure in CI),
a fresh database per test on it, and a throwaway cluster of a test's own, to restart at will."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest

#: the server the contract tests use (one database of their own per test)
SERVER = os.environ.get("JOBFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BIN = Path(os.environ.get("JOBFLEET_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


@cache
def _unreachable() -> str | None:
    """Why the server cannot be used, or None if it can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[dev]')"
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error as e:
        return f"no PostgreSQL at {SERVER} (set JOBFLEET_TEST_PG): {' '.join(str(e).split())}"
    return None


def require_server() -> str:
    """The server's URL; skips the test when it is unreachable, except in CI, where it fails."""
    why = _unreachable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {why}")
        pytest.skip(why)
    return SERVER


def with_database(url: str, name: str) -> str:
    """`url` naming database `name` instead."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new empty database on `server` (its URL), dropped afterwards with whoever uses it."""
    import psycopg

    name = f"jobfleet_test_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A PostgreSQL cluster of the test's own on a free port of 127.0.0.1 (the shared server is
    never touched): made with initdb, started, restarted and stopped with pg_ctl.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user, in a
    folder it can reach.
    """

    def __init__(self, where: Path) -> None:
        if not (BIN / "initdb").exists():
            pytest.skip(f"no PostgreSQL binaries in {BIN} (set JOBFLEET_TEST_PG_BIN)")
        self.as_root = os.getuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="jobfleet-pg-")) if self.as_root else where
        self.data = self.root / "data"
        self.port = free_port()
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "-E", "UTF8")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(BIN / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        # output goes to a file, not a pipe: a server pg_ctl starts would hold a pipe open
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=60,
                                  stdin=subprocess.DEVNULL)
            out.seek(0)
            assert done.returncode == 0, f"{tool} failed: {out.read()}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", options)

    def restart(self) -> None:
        """Restart the server, cutting every connection ("fast" shutdown)."""
        self._run("pg_ctl", "restart", "-w", "-m", "fast", "-D", str(self.data),
                  "-l", str(self.root / "log"))

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data))
        if self.as_root:
            shutil.rmtree(self.root, ignore_errors=True)
