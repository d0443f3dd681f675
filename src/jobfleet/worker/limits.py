"""What a worker says about an attempt that failed, and keeping secret values out of its log."""

from __future__ import annotations

import re
import signal

from jobfleet.blobs import LogWriter

REDACTED = b"[redacted]"
#: signals a program gets, or sends itself, when it cannot have the memory it asks for under
#: an address-space limit (the kernel's OOM killer, a failed allocation's abort or segfault)
_NO_MEMORY_SIGNALS = frozenset({signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV})


def _size(n: int) -> str:
    for unit, step in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= step:
            return f"{n / step:.4g}{unit}"
    return f"{n}B"


def failure_reason(code: int | None, sig: int | None, memory: int, *, oom: bool,
                   address_space: bool) -> str:
    """Why an attempt that ended on its own failed, in words a user can act on.

    `oom`: its control group says the kernel killed it for going over `memory`.
    `address_space`: `memory` was enforced as an address-space limit (no control group), so
    dying of SIGKILL, SIGABRT or SIGSEGV under it most likely means it ran out.
    """
    if oom:
        return f"out of memory (over its limit of {_size(memory)})"
    if memory and address_space and sig in _NO_MEMORY_SIGNALS:
        return (f"out of memory (killed by signal {sig} under its address-space limit of "
                f"{_size(memory)})")
    return f"exit code {code}" if sig is None else f"killed by signal {sig}"


class Redactor(LogWriter):
    """A log writer that replaces secret values with `[redacted]` before they are stored.

    A value split between two reads of the job's output is still found: the last
    (longest secret - 1) bytes of each write are held back until the next write or the close.
    """

    __slots__ = ("_inner", "_pattern", "_held", "_keep")

    def __init__(self, inner: LogWriter, secrets: list[str]) -> None:
        self._inner = inner
        values = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        # longest first: where a secret holds another, the whole of it is replaced
        self._pattern = re.compile(b"|".join(re.escape(v) for v in values) or b"(?!)")
        self._keep = max((len(v) for v in values), default=1) - 1
        self._held = b""  # raw output not stored yet: it may hold the start of a secret
        self.key = inner.key
        self.written = False

    @property
    def due_at(self) -> float | None:  # type: ignore[override]
        return self._inner.due_at

    def _clean(self, data: bytes) -> bytes:
        return self._pattern.sub(REDACTED, data)

    def write(self, data: bytes) -> None:
        data = self._held + data
        cut = max(0, len(data) - self._keep)
        for m in self._pattern.finditer(data):  # never cut through a secret
            if m.start() < cut < m.end():
                cut = m.start()
                break
        out, self._held = data[:cut], data[cut:]
        if out:
            self._inner.write(self._clean(out))
            self.written = self._inner.written

    def tick(self, now: float) -> None:
        self._inner.tick(now)

    def close(self) -> None:
        if self._held:
            self._inner.write(self._clean(self._held))
            self._held = b""
        self._inner.close()
        self.written = self._inner.written

    def failure(self) -> str | None:
        return self._inner.failure()

    def redact_text(self, text: str) -> str:
        return self._clean(text.encode()).decode(errors="replace")
