"""Shared fixtures for the acceptance tests: a `jobfleet` command bound to a store in tmp_path,
waiting on conditions with a deadline, and finding (and cleaning up) a test's job processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05,
             what: str | None = None) -> T:
    """Call `predicate` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}"
                                 f" (last value: {value!r})")
        time.sleep(interval)


class Pids(list[int]):
    """Process ids that show each one's command line when printed, so that a failed
    `assert not pids_with(...)` says what was left running."""

    def __repr__(self) -> str:
        return repr({pid: _cmdline(pid) for pid in self})


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return "(gone)"


def pids_with(marker: str) -> Pids:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = Pids()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[-1].split()[0]
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


class Jobfleet:
    """Runs `python -m jobfleet ...` in `cwd` (tmp_path) against a store and blobs in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.store_path = tmp_path / "state" / "jobfleet.db"
        self.blobs = tmp_path / "state" / "blobs"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLEET_")}
        env.update(JOBFLEET_STORE=str(self.store_path), JOBFLEET_BLOBS=str(self.blobs),
                   PYTHONUNBUFFERED="1")
        self.env = env
        self.procs: list[subprocess.Popen[str]] = []

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {**self.env, **(extra or {})}

    def __call__(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60, check: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command to its end; with `check`, assert its exit status."""
        p = subprocess.run([sys.executable, "-m", "jobfleet", *args], cwd=cwd or self.cwd,
                           env=self._env(env), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check is not None:
            assert p.returncode == check, (
                f"jobfleet {' '.join(args)} exited {p.returncode}, not {check}\n"
                f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self(*args, "--json", check=0, **kw).stdout)

    def popen(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[str]:
        """Start a command in the background; it is killed at teardown if still running."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen([sys.executable, "-m", "jobfleet", *args], cwd=cwd or self.cwd,
                             env=self._env(env), text=True, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def jobs(self, run: str) -> dict[str, dict[str, Any]]:
        """`jobs RUN --json`, by job id."""
        return {j["job"]: j for j in self.json("jobs", run)}

    def submit(self, *args: str) -> str:
        return str(self.json("submit", *args)["run"])

    def log_path(self, run: str, seq: int, attempt: int) -> Path:
        return self.blobs / "logs" / run / f"{seq}-{attempt}.log"

    def log(self, run: str, seq: int, attempt: int = 1) -> str:
        path = self.log_path(run, seq, attempt)
        return path.read_text() if path.exists() else ""

    def open_store(self) -> Any:
        from jobfleet.store import open_store

        return open_store(self.store_path)

    def cleanup(self) -> None:
        """Kill what the test started and left running: commands, and the workers they spawned
        (`jobfleet run` starts its workers in their own sessions)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=10)
        if not self.store_path.exists():
            return
        with self.open_store() as db:
            workers = [w for w in db.workers() if w.state in ("running", "draining")]
        for w in workers:
            with contextlib.suppress(OSError):
                if b"jobfleet" in Path(f"/proc/{w.pid}/cmdline").read_bytes():
                    os.kill(w.pid, signal.SIGKILL)


@pytest.fixture
def jf(tmp_path: Path) -> Iterator[Jobfleet]:
    fleet = Jobfleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.cleanup()


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique number for `sleep` (e.g. `sleep 300.123456`) that finds a test's job processes;
    whatever still carries it at teardown is killed, so a failing test leaves nothing behind."""
    mark = f"300.{secrets.randbelow(10**6):06d}"
    yield mark
    for pid in pids_with(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# moto's S3 emulator, for every test module that asks for `s3` (imported last: s3.py is plain)
from s3 import moto_endpoint, s3  # noqa: E402,F401
