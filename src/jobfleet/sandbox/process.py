"""The `process` sandbox: each attempt runs in its own session and process group.

A command is run by `/bin/sh -c COMMAND`, or started directly when it is a plain word list
(see `command.direct_argv`): the same behaviour, one program start fewer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from jobfleet.sandbox.command import direct_argv
from jobfleet.sandbox.spawn import spawn

_SHELL = b"/bin/sh"
#: a direct start failing with these is retried through the shell, whose message and exit
#: status (127 not found, 126 not executable, or running a script without #!) the user expects
_SHELL_DECIDES = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR})
_SELF = resource.RUSAGE_SELF


@dataclass(slots=True)
class Child:
    """A running attempt: its process (leader of its own process group) and a pidfd to poll."""

    pid: int
    pidfd: int
    out: int  # read end of the pipe that carries the attempt's stdout and stderr

    def signal_group(self, sig: int) -> None:
        """Send `sig` to every process of the attempt's group (the leader's pid is the pgid)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap(self) -> tuple[int | None, int | None, int | None]:
        """Collect the exited leader and kill whatever is left of its group.

        Returns (exit_code, signal, peak_rss_bytes or None when it is not known). Call only
        once the pidfd is readable: the leader is then a zombie, so its pid (the group id)
        cannot have been reused yet.
        """
        self.signal_group(signal.SIGKILL)
        _, status, usage = os.wait4(self.pid, 0)
        os.close(self.pidfd)
        code = os.waitstatus_to_exitcode(status)
        # A child started from this process inherits our memory high-water mark at its first
        # exec, so its maxrss only tells its own peak when it went above ours.
        own = resource.getrusage(_SELF).ru_maxrss
        peak = usage.ru_maxrss * 1024 if usage.ru_maxrss > own else None
        return (code, None, peak) if code >= 0 else (None, -code, peak)


class ProcessSandbox:
    """Start attempts as plain processes on this machine, each in a new session.

    `start` is safe to call from several threads at once; it holds no lock and does not
    change the worker's own working directory.
    """

    name = "process"

    def start(self, command: str, *, cwd: str, env: Sequence[bytes], own_path: bool = True
              ) -> Child:
        """Start `command`; its output goes to a pipe whose read end is `Child.out`.

        `own_path`: `env` has this process's PATH, so a program can be looked up without
        the shell (otherwise the shell looks it up on the job's PATH).
        """
        read, write = os.pipe2(os.O_CLOEXEC)
        folder = os.fsencode(cwd)
        try:
            argv = direct_argv(command) if own_path else None
            if argv is not None:
                try:
                    pid = spawn(argv, env, folder, write)
                except OSError as e:
                    if e.errno not in _SHELL_DECIDES:
                        raise
                    argv = None
            if argv is None:
                pid = spawn([_SHELL, b"-c", command.encode()], env, folder, write)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        os.set_blocking(read, False)
        return Child(pid, os.pidfd_open(pid), read)
