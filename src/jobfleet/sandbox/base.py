"""The sandbox interface: prepare an attempt, run it, tear it down (also after a timeout).

A worker asks its sandbox for one attempt at a time with an `Attempt`: the command, where it
runs, its environment (built by the worker, see `sandbox.env`), its fresh workspace and its
limits. `prepare` sets up what the attempt needs before it starts (a control group),
`run` starts it and returns a `Child` to watch, and `teardown` — called once the child has
been reaped, however it ended — removes what `prepare` made and says whether the attempt
ran out of memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from jobfleet.errors import JobfleetError


class SandboxError(JobfleetError):
    """The sandbox could not set up or start an attempt (not the job's own failure)."""

    exit_code = 2


@dataclass(slots=True)
class Attempt:
    """What to run and how: everything a sandbox needs to start one attempt."""

    command: str
    cwd: str  # the job's working directory: its workdir, or the workspace
    env: Sequence[bytes]  # NAME=value entries
    workspace: str  # a fresh, writable folder: the job's HOME and TMPDIR
    own_path: bool = True  # env's PATH is this process's (programs may be looked up here)
    memory: int = 0  # bytes the attempt may use; 0: no limit
    cpus: float | None = None  # CPUs the attempt may use; None: not enforced
    network: bool = True  # may it reach the network (sandboxes that can cut it off)
    image: str | None = None  # container image (the container sandbox)
    writable: tuple[str, ...] = ()  # folders besides the workspace it may write (its workdir)
    name: str = "attempt"  # unique among this worker's attempts, for control groups
    prepared: object = field(default=None)  # what `prepare` made, for `teardown`


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
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = usage.ru_maxrss * 1024 if usage.ru_maxrss > own else None
        return (code, None, peak) if code >= 0 else (None, -code, peak)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What teardown learnt: did the attempt hit its memory limit, and its peak memory."""

    out_of_memory: bool = False
    peak_memory: int | None = None


class Sandbox(ABC):
    """How attempts are started on this machine. One instance serves a whole worker."""

    name: str
    #: does this sandbox keep jobs off the network unless they ask (and are allowed)?
    cuts_network: bool = False

    def check(self) -> None:
        """Raise SandboxError, saying what to do, when this sandbox cannot work here.

        Called once when a worker starts, so a missing tool is reported before any job.
        """
        return None

    def prepare(self, attempt: Attempt) -> None:
        """Set up what `attempt` needs before it starts (raise SandboxError if that fails)."""
        return None

    @abstractmethod
    def run(self, attempt: Attempt) -> Child:
        """Start the prepared attempt; raise SandboxError, or OSError for the job's own
        problems (a missing working directory)."""

    def teardown(self, attempt: Attempt) -> Verdict:
        """Remove what `prepare` made, once the attempt's child has been reaped."""
        return Verdict()


class Workspaces:
    """Fresh per-attempt folders under one root, removed once their attempt is over."""

    def __init__(self, root: str, *, keep: bool = False) -> None:
        self.root, self.keep = root, keep

    def open(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def make(self, name: str) -> str:
        path = os.path.join(self.root, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # left by an attempt of the same name: start it clean
            shutil.rmtree(path, ignore_errors=True)
            os.mkdir(path, 0o700)
        return path

    def remove(self, path: str) -> None:
        """Delete an attempt's workspace (unless kept for debugging); cheap when empty."""
        if self.keep:
            return
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if not self.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.root)


def sandbox_named(name: str) -> Sandbox:
    """The sandbox called `name`: process, bwrap or container (not checked yet)."""
    if name == "process":
        from jobfleet.sandbox.process import ProcessSandbox
        return ProcessSandbox()
    if name == "bwrap":
        from jobfleet.sandbox.bwrap import BwrapSandbox
        return BwrapSandbox()
    if name == "container":
        from jobfleet.sandbox.container import ContainerSandbox
        return ContainerSandbox()
    raise SandboxError(f"there is no sandbox called {name!r}",
                       hint="choose one of: process (the default), bwrap, container")


#: the sandboxes there are, in the order --help lists them
SANDBOXES = ("process", "bwrap", "container")
