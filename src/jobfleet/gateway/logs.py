"""Logs through a jobfleet server: output held back and sent in chunks, each saying where it
goes (its offset in the log), so a chunk sent twice is stored once.

A running job's output is sent at most every CHUNK_AGE seconds (or per CHUNK_SIZE); what is
left when an attempt ends waits for the worker's next request to the server (the report of
that very attempt, usually), so a short job's log costs no request of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from jobfleet.blobs.base import LogWriter
from jobfleet.errors import JobfleetError
from jobfleet.gateway import wire

if TYPE_CHECKING:
    from jobfleet.gateway.client import Session

log = logging.getLogger("jobfleet.gateway")

#: a chunk is sent once this much output waits, bytes ...
CHUNK_SIZE = 1024 * 1024
#: ... or once the oldest byte waiting is this old, seconds
CHUNK_AGE = 1.0


class PendingLogs:
    """Chunks waiting to ride along with the worker's next request."""

    def __init__(self) -> None:
        self._chunks: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, key: str, offset: int, number: int, data: bytes) -> None:
        with self._lock:
            self._chunks.append({"key": key, "offset": offset, "number": number,
                                 "data": wire.b64(data)})

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            chunks, self._chunks = self._chunks, []
        return chunks

    def __bool__(self) -> bool:
        return bool(self._chunks)


def report_refused(answer: Any) -> None:
    """Log the chunks the server would not store (their job is no longer this worker's)."""
    for refused in (answer.get("logs_refused") or []) if isinstance(answer, dict) else []:
        log.warning("log %s not stored: %s", refused.get("key"), refused.get("why"),
                    extra={"action": "log_chunk_refused"})


class GatewayLogWriter(LogWriter):
    """One attempt's output, sent to the server in chunks."""

    __slots__ = ("_session", "_pending", "_held", "_sent", "_number", "due_at")

    def __init__(self, session: Session, pending: PendingLogs, key: str) -> None:
        self._session, self._pending, self.key = session, pending, key
        self._held = bytearray()
        self._sent = 0  # bytes handed on so far: the next chunk's offset
        self._number = 0
        self.written = False
        self.due_at: float | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.written = True
        if not self._held:
            self.due_at = time.monotonic() + CHUNK_AGE
        self._held += data
        if len(self._held) >= CHUNK_SIZE:
            self._send()

    def tick(self, now: float) -> None:
        if self.due_at is not None and now >= self.due_at:
            self._send()

    def _queue(self) -> None:
        if self._held:
            self._number += 1
            self._pending.add(self.key, self._sent, self._number, bytes(self._held))
            self._sent += len(self._held)
            self._held.clear()
        self.due_at = None

    def _send(self) -> None:
        """Send what is held (and any other chunks waiting) now."""
        self._queue()
        chunks = self._pending.take()
        if not chunks:
            return
        try:
            report_refused(self._session.json("POST", "/v1/worker/logs", json={"logs": chunks}))
        except JobfleetError as e:
            log.warning("log %s: output not stored: %s", self.key, e.message,
                        extra={"action": "log_chunk_failed"})

    def close(self) -> None:
        """The rest goes with the worker's next request (the report of this attempt)."""
        self._queue()
