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
import os
import resource
import shutil
import signal
import stat
import tempfile
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


#: this process's own peak resident memory (KiB) when last asked; see Child.reap
_own_peak = 0


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
        # exec, so its maxrss only tells its own peak when it went above ours. Ours only
        # grows: it is asked for again only when the child's is above what we knew of it.
        global _own_peak
        if usage.ru_maxrss > _own_peak:
            _own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = usage.ru_maxrss * 1024 if usage.ru_maxrss > _own_peak else None
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


def pid_namespace() -> str:
    """An id of this process's pid namespace: pids are only compared within one."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


#: the start of a worker's workspaces folder's name, followed by PID-WORKERID
_WORKSPACES = f"jobfleet-ws-{pid_namespace()}-"


#: the file that marks a workspaces folder kept on purpose (--keep-workspaces)
_KEPT = ".kept"


def process_alive(name: str) -> bool:
    """Is the process whose pid starts `name` (`PID-WORKERID`) alive? True if unsure."""
    try:
        pid = int(name.split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, PermissionError):
        return True
    except ProcessLookupError:
        return False
    return True


class Workspaces:
    """Empty per-attempt folders under one root, cleared once their attempt is over.

    Creating and deleting a folder costs a journal write each (about 0.1 ms together on ext4,
    a fifth of a short job's whole cost), so a workspace its job left empty — the common
    case — is handed to the next attempt as it is; one with anything left in it is deleted.
    Either way every attempt starts in an empty folder of its own. `keep` keeps every
    attempt's folder (each under a new name) for debugging.
    """

    def __init__(self, root: str, *, keep: bool = False) -> None:
        self.root, self.keep = root, keep
        self._free: list[str] = []  # empty workspaces, ready for another attempt
        self._uid = os.getuid()

    def open(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if self.keep:  # kept for the user: not tidied away by the next worker (default_root)
            with open(os.path.join(self.root, _KEPT), "w"):
                pass

    @staticmethod
    def default_root(worker_id: str) -> str:
        """This worker's folder in the temporary folder, named after its pid; those of
        workers that died without clearing theirs (SIGKILL) are deleted on the way, unless
        they were kept (--keep-workspaces)."""
        tmp = tempfile.gettempdir()
        with contextlib.suppress(OSError), os.scandir(tmp) as entries:
            for e in entries:
                if e.name.startswith(_WORKSPACES) and not process_alive(
                        e.name[len(_WORKSPACES):]) and not os.path.exists(
                        os.path.join(e.path, _KEPT)):
                    shutil.rmtree(e.path, ignore_errors=True)
        return os.path.join(tmp, f"{_WORKSPACES}{os.getpid()}-{worker_id}")

    def make(self, name: str) -> str:
        """An empty folder for one attempt (`name` is used when a new one is made)."""
        if self._free:
            return self._free.pop()
        path = os.path.join(self.root, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # left by an attempt of the same name: start it clean
            self._delete(path)
            os.mkdir(path, 0o700)
        return path

    def remove(self, path: str) -> None:
        """An attempt is over: keep its folder (`keep`), reuse it if empty, or delete it."""
        if self.keep:
            return
        try:
            st = os.lstat(path)
            if (stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
                    and st.st_uid == self._uid):
                with os.scandir(path) as entries:
                    if next(entries, None) is None:
                        self._free.append(path)
                        return
        except OSError:
            pass
        self._delete(path)

    @staticmethod
    def _delete(path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def close(self) -> None:
        self._free.clear()
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
