"""The `process` sandbox: each attempt is `/bin/sh -c COMMAND` in its own session and group."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass

_SHELL = "/bin/sh"


@dataclass(slots=True)
class Child:
    """A running attempt: its process (leader of its own process group) and a pidfd to poll."""

    pid: int
    pidfd: int

    def signal_group(self, sig: int) -> None:
        """Send `sig` to every process of the attempt's group (the leader's pid is the pgid)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap(self) -> tuple[int | None, int | None, int]:
        """Collect the exited leader and kill whatever is left of its group.

        Returns (exit_code, signal, peak_rss_bytes). Call only once the pidfd is readable: the
        leader is then a zombie, so its pid (the group id) cannot have been reused yet.
        """
        self.signal_group(signal.SIGKILL)
        _, status, usage = os.wait4(self.pid, 0)
        os.close(self.pidfd)
        code = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss * 1024
        return (code, None, peak) if code >= 0 else (None, -code, peak)


class ProcessSandbox:
    """Start attempts as plain processes on this machine, each in a new session.

    posix_spawn cannot set the child's working directory in Python 3.11, so the sandbox
    changes the worker's own directory before spawning. That is only safe where the worker
    owns its process, so off the main thread a lock serialises it and the directory is
    restored afterwards.
    """

    name = "process"

    def __init__(self) -> None:
        self._origin = self._cwd = os.getcwd()
        self._lock = threading.Lock()
        self._stdin = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]

    def start(self, command: str, *, cwd: str, env: Mapping[bytes, bytes], log_fd: int) -> Child:
        actions = [*self._stdin, (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)]
        argv = [_SHELL, "-c", command]
        main = threading.current_thread() is threading.main_thread()
        with self._lock:
            if cwd != self._cwd:
                os.chdir(cwd)
                self._cwd = cwd
            try:
                pid = os.posix_spawn(_SHELL, argv, env, file_actions=actions, setsid=True)
            finally:
                if not main:
                    os.chdir(self._origin)
                    self._cwd = self._origin
        return Child(pid, os.pidfd_open(pid))
