"""The `process` sandbox: each attempt runs in its own session and process group.

A command is run by `/bin/sh -c COMMAND`, or started directly when it is a plain word list
(see `command.direct_argv`): the same behaviour, one program start fewer. A job with no
memory or CPU limit takes that fast path. A limited one starts through a one-line shell
trampoline that puts it in its control group (see `sandbox.cgroup`) or, where no control
group is writable, sets its address-space limit (RLIMIT_AS) before it execs the job.
"""

from __future__ import annotations

import errno
import os
import shlex
from collections.abc import Sequence

from jobfleet.sandbox.base import Attempt, Child, Sandbox, SandboxError, Verdict
from jobfleet.sandbox.cgroup import Cgroups, Group
from jobfleet.sandbox.command import direct_argv
from jobfleet.sandbox.spawn import spawn

_SHELL = b"/bin/sh"
#: a direct start failing with these is retried through the shell, whose message and exit
#: status (127 not found, 126 not executable, or running a script without #!) the user expects
_SHELL_DECIDES = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR})
#: the exit status of a trampoline that could not apply the limits
_LIMITS_FAILED = 125


def job_argv(command: str) -> list[bytes]:
    """The argv that runs `command`: its words, or the shell with it."""
    return direct_argv(command) or [_SHELL, b"-c", command.encode()]


def trampoline(prefix: str, argv: Sequence[bytes]) -> list[bytes]:
    """`argv` started by a shell that first runs `prefix` (applying limits), then execs it."""
    script = (f"{{ {prefix}; }} || {{ echo 'jobfleet: sandbox error: could not apply the "
              f"limits' >&2; exit {_LIMITS_FAILED}; }}; exec \"$@\"")
    return [_SHELL, b"-c", script.encode(), b"jobfleet-limits", *argv]


class ProcessSandbox(Sandbox):
    """Start attempts as plain processes on this machine, each in a new session.

    `run` is safe to call from several threads at once; it holds no lock and does not
    change the worker's own working directory. `cgroups`: where to make the control groups
    of limited attempts (None: limit memory with RLIMIT_AS instead).
    """

    name = "process"

    def __init__(self, cgroups: Cgroups | None = None) -> None:
        self.cgroups = cgroups

    def prepare(self, attempt: Attempt) -> None:
        if not (attempt.memory or attempt.cpus) or self.cgroups is None:
            return
        try:
            attempt.prepared = self.cgroups.create(attempt.name, attempt.memory, attempt.cpus)
        except OSError as e:
            raise SandboxError(f"could not make a control group for {attempt.name}: {e}",
                               hint="check that /sys/fs/cgroup/memory is writable") from e

    def limits_prefix(self, attempt: Attempt) -> str | None:
        """Shell commands applying the attempt's limits, or None when it has none."""
        if isinstance(attempt.prepared, Group):
            return attempt.prepared.enter_script()
        if attempt.memory:
            return f"ulimit -v {max(1, attempt.memory // 1024)}"
        return None

    def run(self, attempt: Attempt) -> Child:
        prefix = self.limits_prefix(attempt)
        if prefix is not None:
            return start(trampoline(prefix, job_argv(attempt.command)), attempt.env, attempt.cwd)
        return self.start(attempt.command, cwd=attempt.cwd, env=attempt.env,
                          own_path=attempt.own_path)

    def teardown(self, attempt: Attempt) -> Verdict:
        group = attempt.prepared
        if not isinstance(group, Group):
            return Verdict()
        verdict = Verdict(group.out_of_memory(), group.peak_memory())
        assert self.cgroups is not None
        self.cgroups.release(group)
        return verdict

    def start(self, command: str, *, cwd: str, env: Sequence[bytes], own_path: bool = True
              ) -> Child:
        """Start `command` with no limits; its output goes to a pipe (`Child.out`).

        `own_path`: `env` has this process's PATH, so a program can be looked up without
        the shell (otherwise the shell looks it up on the job's PATH).
        """
        argv = direct_argv(command) if own_path else None
        if argv is not None:
            try:
                return start(argv, env, cwd)
            except OSError as e:
                if e.errno not in _SHELL_DECIDES:
                    raise
        return start([_SHELL, b"-c", command.encode()], env, cwd)


def start(argv: Sequence[bytes], env: Sequence[bytes], cwd: str) -> Child:
    """Start `argv` in a new session, output to a new pipe; raises OSError."""
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        pid = spawn(argv, env, os.fsencode(cwd), write)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    os.set_blocking(read, False)
    return Child(pid, os.pidfd_open(pid), read)


def quote(argv: Sequence[bytes]) -> str:
    """`argv` as one shell-quoted line, for messages."""
    return " ".join(shlex.quote(os.fsdecode(a)) for a in argv)
