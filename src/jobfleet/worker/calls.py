"""Warm interpreters for Python calls: started on demand (or, with --warm-calls, one per slot as
the worker starts), reused, replaced after a crash or N calls.

A call job's payload is `DIGEST\\n` + the envelope (see `api.wire`) of the pickled (args,
kwargs); the function itself is read once from the blob store and handed to each interpreter
the first time it needs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from jobfleet.api import wire
from jobfleet.blobs import Blobs

#: an interpreter is replaced after this many calls, so leaks in user code stay bounded
RECYCLE_AFTER = 10_000


def split_payload(payload: bytes) -> tuple[str, bytes]:
    """(function digest, envelope of the pickled arguments) of a stored call."""
    digest, _, call = payload.partition(b"\n")
    return digest.decode(), call


@dataclass(eq=False)
class Runner:
    """One warm interpreter, the pipes to it, and what it has been sent."""

    pid: int
    pidfd: int
    to_runner: int
    from_runner: int
    out: int  # its stdout and stderr
    calls: int = 0
    ready: bool = False  # it said it has imported what it needs
    known: set[str] = field(default_factory=set)
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    def start(cls, env: dict[str, str], cwd: str) -> Runner:
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobfleet.api.runner", "--fds", f"{to_r},{from_w}"],
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, pass_fds=(to_r, from_w),
                cwd=cwd, env=env, start_new_session=True)
        finally:
            for fd in (to_r, from_w, out_w):
                os.close(fd)
        proc.returncode = 0  # reaped by us through the pidfd, not by Popen
        for fd in (from_r, out_r):
            os.set_blocking(fd, False)
        return cls(proc.pid, os.pidfd_open(proc.pid), to_w, from_r, out_r)

    def send(self, key: int, payload: bytes, blobs: Blobs, bodies: dict[str, bytes]) -> None:
        digest, call = split_payload(payload)
        body = None
        if digest not in self.known:
            if digest not in bodies:
                bodies[digest] = wire.open_envelope(blobs, b"B" + wire.function_key(digest).encode())
            body = bodies[digest]
            self.known.add(digest)
        self.calls += 1
        wire.write_frame(self.to_runner, (key, digest, body, wire.open_envelope(blobs, call)))

    def results(self) -> list[tuple[int, bytes]] | None:
        """The answers that have arrived; None once the interpreter closed its end."""
        while True:
            try:
                data = os.read(self.from_runner, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                return None
            self.buffer += data
        answers = wire.take_frames(self.buffer)
        if answers and answers[0] == wire.READY:  # said once, first
            self.ready = True
            del answers[0]
        return answers

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap(self) -> tuple[int | None, int | None]:
        """Kill what is left, collect the exit; (exit_code, signal)."""
        self.signal_group(signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        for fd in (self.pidfd, self.to_runner, self.from_runner, self.out):
            with contextlib.suppress(OSError):
                os.close(fd)
        code = os.waitstatus_to_exitcode(status)
        return (code, None) if code >= 0 else (None, -code)
