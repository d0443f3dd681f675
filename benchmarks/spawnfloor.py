#!/usr/bin/env python3
"""The floor of a job runner written in Python: the least it must do to run jobs.

Reads one command per line on stdin and runs them, `--slots` at a time, each started as
jobfleet starts a plain command (its words exec'd directly, in a new session, its output to a
pipe), then waits for it. Nothing is stored, logged or retried. A reference for W1, not a
competitor: what is left between it and jobfleet is the cost of jobfleet's record keeping,
and what is left between it and xargs is the cost of starting processes from Python.

    python benchmarks/spawnfloor.py --slots 2 < commands.txt
"""

from __future__ import annotations

import argparse
import os
import select
import sys


def start(command: str) -> tuple[int, int, int]:
    """(pid, pidfd, read end of its output pipe) of `command` started without a shell, or
    through one when its program is not on PATH (a shell builtin, say), as jobfleet does."""
    argv = command.split()
    read, write = os.pipe2(os.O_CLOEXEC)
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, write, 1), (os.POSIX_SPAWN_DUP2, write, 2)]
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, setsid=True, file_actions=actions)
    except FileNotFoundError:
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", command], os.environ, setsid=True,
                             file_actions=actions)
    os.close(write)
    return pid, os.pidfd_open(pid), read


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--slots", type=int, default=2)
    a = p.parse_args()
    commands = [line for line in sys.stdin.read().splitlines() if line.strip()]
    poller, running, failed = select.poll(), {}, 0
    todo = iter(commands)
    while True:
        while len(running) < a.slots and (command := next(todo, None)) is not None:
            pid, pidfd, out = start(command)
            running[pidfd] = (pid, out)
            poller.register(pidfd, select.POLLIN)
        if not running:
            return 1 if failed else 0
        for pidfd, _ in poller.poll():
            pid, out = running.pop(pidfd)
            poller.unregister(pidfd)
            _, status = os.waitpid(pid, 0)
            failed += status != 0
            while os.read(out, 65536):  # what it printed, dropped
                pass
            os.close(out)
            os.close(pidfd)


if __name__ == "__main__":
    sys.exit(main())
