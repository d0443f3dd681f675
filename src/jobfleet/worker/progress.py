"""Is a running attempt making progress? The CPU time its processes have used, from /proc.

An attempt's processes are its leader's descendants, and the members of its process group
(the leader's pid is the group's id); both are counted, so a job that moved to a session of
its own (bwrap does) is still seen. CPU time includes what exited children used, once their
parent waited for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, process group, CPU seconds) of every process we can see."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # after "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime cutime cstime ...
        fields = stat.rpartition(b")")[2].split()
        try:
            cpu = sum(int(x) for x in fields[11:15]) / _TICK
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), cpu)
        except (IndexError, ValueError):
            continue
    return found


def cpu_seconds(leaders: Iterable[int]) -> dict[int, float]:
    """CPU seconds used so far by each attempt, by its leader's pid (one pass over /proc)."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    used = {}
    for leader in leaders:
        seen = {pid for pid, (_, pgrp, _) in procs.items() if pgrp == leader}
        todo = [leader]
        while todo:
            pid = todo.pop()
            if pid in procs:
                seen.add(pid)
                todo.extend(children.get(pid, ()))
        used[leader] = sum(procs[pid][2] for pid in seen if pid in procs)
    return used
