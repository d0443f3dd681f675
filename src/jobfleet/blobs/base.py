"""The blob store interface: what the worker, the API and the CLI may ask of any blob store.

A key is a relative path (`logs/RUN/7-1.log`, `results/RUN/7-1.pkl`, `outputs/RUN/7/a.txt`).
A blob is either one whole object, written at once by `put`/`put_file`, or a log, which grows
while its attempt runs (see `LogWriter`); `read`, `size` and `tail` work on both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from jobfleet.errors import JobfleetError

#: the end of a text blob that `tail` reads to find its last lines, bytes
TAIL_WINDOW = 64 * 1024


class BlobError(JobfleetError, OSError):
    """The blob store could not be read or written."""


def log_key(run_id: str, seq: int, attempt: int) -> str:
    """Where the log of one attempt lives, relative to the blob store's root."""
    return f"logs/{run_id}/{seq}-{attempt}.log"


def outputs_prefix(run_id: str, seq: int | None = None) -> str:
    """The folder of a run's uploaded outputs (`outputs/RUN`), or of one job's (`outputs/RUN/7`)."""
    return f"outputs/{run_id}" if seq is None else f"outputs/{run_id}/{seq}"


def mask_url(url: str) -> str:
    """`url` fit to print: a password in it is replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class LogWriter(ABC):
    """Appends one attempt's output to its log as the output arrives.

    `written` tells whether anything was written (an attempt that printed nothing has no log).
    A writer may hold output back to store it in larger pieces; `due_at` is then the
    `time.monotonic()` moment by which `tick` must be called to store it, else None.
    `close` stores whatever is left.
    """

    __slots__ = ("key", "written")

    key: str
    written: bool
    due_at: float | None

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append `data` to the log."""

    @abstractmethod
    def tick(self, now: float) -> None:
        """Store output held back for longer than it may wait (`now`: time.monotonic())."""

    @abstractmethod
    def close(self) -> None:
        """Store what is left; the log is complete."""

    def failure(self) -> str | None:
        """Why some of the output could not be stored (and was dropped), or None."""
        return None


class Blobs(ABC):
    """Keys mapped to blobs under one root: a local folder or a URL (see `open_blobs`)."""

    #: where the store is, fit to print (no password)
    url: str
    #: what another process passes to `--blobs` to open the same store
    location: str

    @abstractmethod
    def log_writer(self, key: str) -> LogWriter:
        """Where one attempt's output goes; nothing is stored until the first byte arrives."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob (or a log with at least one byte) is stored under `key`."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically: a reader sees the old blob or all of the new."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> int:
        """Store the local file `path` under `key`, atomically as `put`; returns its size."""

    @abstractmethod
    def get_file(self, key: str, path: str | Path) -> int:
        """Copy the blob `key` to the local file `path` (replaced whole); returns its size."""

    @abstractmethod
    def read(self, key: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes of `key` from `offset`, at most `limit`; b"" when it does not exist (yet)."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """How many bytes `key` holds so far; None when it does not exist."""

    @abstractmethod
    def find(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every blob under the folder `prefix`, sorted by key; a log counts
        as one blob."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob under the folder `prefix` (e.g. `results/RUN`); returns how many."""

    def tail(self, key: str, lines: int) -> list[str]:
        """The last `lines` lines of a text blob (read from the end, however large it is)."""
        size = self.size(key)
        if size is None or lines <= 0:
            return []
        text = self.read(key, max(0, size - TAIL_WINDOW)).decode("utf-8", "replace")
        return text.splitlines()[-lines:]
