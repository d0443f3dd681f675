"""The `local` provider: worker processes on this machine, each in a session of its own.

Every worker leaves `WORKER.pid` and `WORKER.log` in the fleet's folder
(`~/.cache/jobfleet/fleets/FLEET/` unless `state_dir` says otherwise); `list` reads those, so
any process (`jobfleet fleet status`) sees the same workers the autoscaler started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jobfleet.fleet.base import (
    CREDENTIAL_VARIABLES,
    READY,
    STOPPED,
    LaunchSpec,
    Machine,
    OnChange,
    Provider,
    option,
)

#: how long terminated workers get to drain before they are killed, seconds
DRAIN = 30.0
LOG_TAIL = 20
#: how long a killed worker may take to be gone, seconds
_KILLED_GONE_WITHIN = 5.0


def default_state_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "jobfleet" / "fleets"


def tail(path: Path, lines: int = LOG_TAIL) -> tuple[str, ...]:
    """The last lines of a text file (empty when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16 * 1024))
            return tuple(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ()


def running(pid: int, marker: str) -> bool:
    """Is `pid` a live (not zombie) process whose command line holds `marker`?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except (OSError, IndexError):
        return False


class LocalProvider(Provider):
    name = "local"

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        super().__init__(fleet, settings, on_change)
        root = option(self.name, settings, "state_dir", lambda v: Path(str(v)).expanduser(),
                      default_state_dir())
        self.python = str(option(self.name, settings, "python", str, sys.executable))
        self.dir = Path(str(root)) / fleet
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def launch(self, n: int, spec: LaunchSpec) -> list[Machine]:
        self.dir.mkdir(parents=True, exist_ok=True)
        # in gateway mode the workers hold a worker token, none of this process's credentials
        env = {k: v for k, v in os.environ.items()
               if not (spec.server and k in CREDENTIAL_VARIABLES)} | spec.worker_env()
        machines = []
        for _ in range(n):
            wid = f"{self.fleet}-{secrets.token_hex(3)}"
            with open(self.dir / f"{wid}.log", "ab") as log:
                child = subprocess.Popen(
                    [self.python, "-m", "jobfleet", "worker", *spec.worker_args(wid)],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True)
            self._children[child.pid] = child
            (self.dir / f"{wid}.pid").write_text(f"{child.pid}\n")
            m = Machine(wid, self.name, self.fleet, READY, wid, "localhost", spec.run_id)
            self.on_change(m)
            machines.append(m)
        return machines

    def _pid(self, wid: str) -> int | None:
        try:
            return int((self.dir / f"{wid}.pid").read_text())
        except (OSError, ValueError):
            return None

    def list(self) -> list[Machine]:
        for child in list(self._children.values()):  # reap ours, so they show as gone
            if child.poll() is not None:
                del self._children[child.pid]
        found = []
        for pidfile in sorted(self.dir.glob("*.pid")):
            wid = pidfile.stem
            pid = self._pid(wid)
            if pid is not None and running(pid, wid):
                found.append(Machine(wid, self.name, self.fleet, READY, wid, "localhost"))
            else:
                found.append(Machine(wid, self.name, self.fleet, STOPPED, wid, "localhost",
                                     reason="its worker exited",
                                     log_tail=tail(self.dir / f"{wid}.log")))
        return found

    def terminate(self, ids: Sequence[str]) -> None:
        pids = {wid: pid for wid in ids if (pid := self._pid(wid)) is not None}
        left = self._stop(pids, lambda pid: os.kill(pid, signal.SIGTERM), DRAIN)  # drains
        self._stop(left, lambda pid: os.killpg(pid, signal.SIGKILL), _KILLED_GONE_WITHIN)
        for wid in ids:
            (self.dir / f"{wid}.pid").unlink(missing_ok=True)

    def _stop(self, pids: dict[str, int], send: Callable[[int], None],
              within: float) -> dict[str, int]:
        """`send` to each worker still running, then wait up to `within` seconds for them to
        be gone; the ones still there."""
        live = {wid: pid for wid, pid in pids.items() if running(pid, wid)}
        for pid in live.values():
            with contextlib.suppress(ProcessLookupError):
                send(pid)
        until = time.monotonic() + within
        while live and time.monotonic() < until:
            self.list()  # reaps our own children
            time.sleep(0.02)
            live = {wid: pid for wid, pid in live.items() if running(pid, wid)}
        return live

    def describe(self) -> dict[str, object]:
        return {"provider": self.name, "fleet": self.fleet, "where": "this machine",
                "state_dir": str(self.dir), "python": self.python}
