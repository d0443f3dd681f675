"""Per-attempt control groups (cgroup v1 memory and cpu controllers), where they are writable.

A job with a memory limit runs in a group of its own under
`/sys/fs/cgroup/memory/jobfleet/WORKER/`; the kernel holds it to its limit and counts the
times it killed a process for going over it, so the worker can say `out of memory` with
certainty. The same group (under the cpu controller) carries a CPU quota. Teardown kills
whatever is left in the group — also processes that left the job's process group with
setsid — and removes it.

The child enters its group before it runs any of the job's code: it is started through a
one-line shell trampoline that writes its own pid into the groups and then execs the job
(posix_spawn cannot place a child in a group, and moving it after it started would let it
allocate, or fork, outside its limit first).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from jobfleet.sandbox.base import pid_namespace, process_alive

ROOT = "/sys/fs/cgroup"
#: worker folders are named NS-PID-WORKERID: only those of this pid namespace are swept
_NS = f"{pid_namespace()}-"
#: the CFS period written with a CPU quota, microseconds
_PERIOD = 100_000


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: str, default: int = 0) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or default)
    except (OSError, ValueError):
        return default


@dataclass(slots=True)
class Group:
    """One attempt's groups: a folder per controller it uses."""

    memory: str | None
    cpu: str | None

    @property
    def folders(self) -> list[str]:
        return [f for f in (self.memory, self.cpu) if f]

    def enter_script(self) -> str:
        """Shell commands that move the shell running them into the groups."""
        return " && ".join(f"echo $$ >{f}/cgroup.procs" for f in self.folders)

    def out_of_memory(self) -> bool:
        """Did the kernel kill a process of the group for going over its memory limit?"""
        if self.memory is None:
            return False
        try:
            with open(f"{self.memory}/memory.oom_control") as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value) > 0
        except (OSError, ValueError):
            pass
        return _read_int(f"{self.memory}/memory.failcnt") > 0  # older kernels

    def peak_memory(self) -> int | None:
        if self.memory is None:
            return None
        return _read_int(f"{self.memory}/memory.max_usage_in_bytes") or None

    def kill_all(self) -> None:
        """SIGKILL every process still in the group (setsid or not)."""
        for folder in self.folders:
            try:
                with open(f"{folder}/cgroup.procs") as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self, wait: float = 1.0) -> bool:
        """Kill what is left and delete the groups; False if one is still busy after `wait`."""
        deadline = time.monotonic() + wait
        for folder in self.folders:
            while True:
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: processes still in it, exiting
                    if time.monotonic() >= deadline:
                        return False
                    self.kill_all()
                    time.sleep(0.005)
        return True


def _sweep(folder: str) -> None:
    """Remove the groups of workers that died without removing theirs (SIGKILL)."""
    try:
        workers = [e.path for e in os.scandir(folder) if e.is_dir() and e.name.startswith(_NS)
                   and not process_alive(e.name[len(_NS):])]
    except OSError:
        return
    for worker in workers:
        with contextlib.suppress(OSError):
            for e in os.scandir(worker):
                if e.is_dir():
                    Group(e.path, None).remove(0.2)
            os.rmdir(worker)


class Cgroups:
    """Creates per-attempt groups under one worker's folder in each controller's hierarchy."""

    def __init__(self, memory: str | None, cpu: str | None) -> None:
        self.memory, self.cpu = memory, cpu
        self._busy: list[Group] = []  # groups that could not be removed yet

    @classmethod
    def open(cls, worker_id: str, root: str = ROOT) -> Cgroups | None:
        """This worker's folders, or None when no controller is there or writable (cgroup v2
        and unprivileged workers use the address-space limit instead)."""
        found: dict[str, str | None] = {}
        for controller in ("memory", "cpu"):
            base = os.path.join(root, controller)
            folder = os.path.join(base, "jobfleet", f"{_NS}{os.getpid()}-{worker_id}")
            found[controller] = None
            if not os.path.exists(os.path.join(base, "cgroup.procs")):
                continue
            _sweep(os.path.join(base, "jobfleet"))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError:
                continue
            found[controller] = folder
        if found["memory"] is None:
            if found["cpu"]:
                with contextlib.suppress(OSError):
                    os.rmdir(found["cpu"])
            return None
        return cls(found["memory"], found["cpu"])

    def create(self, name: str, memory: int, cpus: float | None) -> Group:
        """A group limited to `memory` bytes (0: no limit) and `cpus` CPUs (None: no quota).

        Raises OSError when the kernel refuses a folder or a limit.
        """
        self._retry_busy()
        group = Group(None, None)
        try:
            if self.memory:
                group.memory = folder = os.path.join(self.memory, name)
                os.mkdir(folder)
                if memory:
                    _write(f"{folder}/memory.limit_in_bytes", str(memory))
                    if os.path.exists(f"{folder}/memory.memsw.limit_in_bytes"):
                        with contextlib.suppress(OSError):  # swap accounting may be off
                            _write(f"{folder}/memory.memsw.limit_in_bytes", str(memory))
            if self.cpu and cpus:
                group.cpu = folder = os.path.join(self.cpu, name)
                os.mkdir(folder)
                _write(f"{folder}/cpu.cfs_period_us", str(_PERIOD))
                _write(f"{folder}/cpu.cfs_quota_us", str(max(1000, int(cpus * _PERIOD))))
        except OSError:
            group.remove(0)
            raise
        return group

    def release(self, group: Group) -> None:
        """Remove a group after its attempt; one still busy is retried later."""
        group.kill_all()
        if not group.remove():
            self._busy.append(group)

    def _retry_busy(self) -> None:
        if self._busy:
            self._busy = [g for g in self._busy if not g.remove(0)]

    def close(self) -> None:
        for g in self._busy:
            g.kill_all()
            g.remove()
        for folder in (self.memory, self.cpu):
            if folder:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
