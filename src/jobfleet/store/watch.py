"""Waking an idle worker the moment work may have arrived, instead of at its next poll.

A store gives its worker a `Watch`: a file descriptor that becomes readable when the store
changed. The worker polls it beside its jobs' pipes and leases at once when it fires. For SQLite
that is inotify on the database's folder, filtered to the database's own files (every commit
writes its write-ahead log); PostgreSQL uses the socket of a LISTEN connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from pathlib import Path
from typing import Protocol

_IN_MODIFY = 0x002
_IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class Watch(Protocol):
    """A readable file descriptor while the store has changed since the last `clear`."""

    def fileno(self) -> int: ...

    def clear(self) -> bool:
        """Consume what woke us; True if it concerned the store (not, say, a neighbour file)."""
        ...

    def close(self) -> None: ...


class FileWatch:
    """inotify on a folder, reporting writes to files whose names start with `prefix`."""

    def __init__(self, folder: Path, prefix: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(fd, os.fsencode(folder), _IN_MODIFY | _IN_CREATE) < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"cannot watch {folder}")
        self._fd = fd
        self._prefix = os.fsencode(prefix)

    def fileno(self) -> int:
        return self._fd

    def clear(self) -> bool:
        ours = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return ours
            at = 0
            while at < len(data):
                _, _, _, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size: at + _EVENT.size + size].rstrip(b"\0")
                ours = ours or name.startswith(self._prefix)
                at += _EVENT.size + size

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def watch_file(path: Path) -> FileWatch | None:
    """A watch on the SQLite file at `path` (its journal included), or None where inotify is
    not available; the caller then polls."""
    try:
        return FileWatch(path.parent, path.name)
    except (OSError, AttributeError):
        return None
