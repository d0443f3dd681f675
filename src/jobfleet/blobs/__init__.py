"""The blob store: per-attempt logs (later payloads and outputs), in a local folder for now."""

from __future__ import annotations

import os
from pathlib import Path

from jobfleet.errors import ConfigError


def log_key(run_id: str, seq: int, attempt: int) -> str:
    """Where the log of one attempt lives, relative to the blob store's root."""
    return f"logs/{run_id}/{seq}-{attempt}.log"


class Blobs:
    """Keys (`logs/RUN/7-1.log`) mapped to files under one folder."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        scheme, sep, rest = self.url.partition("://")
        if sep and scheme != "file":
            # refused here, not at the first job: a worker must not start and then fail them all
            raise ConfigError(
                f"the blob store {self.url} is not supported yet: only local folders are",
                hint="pass a folder to --blobs (or JOBFLEET_BLOBS)",
            )
        self.root = Path(rest if sep else self.url).expanduser().absolute()
        self._root_text = str(self.root)
        self._made: set[str] = set()

    def local_path(self, key: str) -> Path:
        """The file behind `key`."""
        return self.root / key

    def log_writer(self, key: str) -> LogWriter:
        """Where one attempt's output goes; nothing is created until the first byte arrives."""
        return LogWriter(self, key)

    def _create(self, key: str) -> int:
        path = os.path.join(self._root_text, key)
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def exists(self, key: str) -> bool:
        return os.path.exists(os.path.join(self._root_text, key))

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically: written beside it, then renamed into place."""
        path = os.path.join(self._root_text, key)
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob under the folder `prefix` (e.g. `results/RUN`); returns how many."""
        import shutil

        folder = self.root / prefix
        if not folder.is_dir():
            return 0
        n = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return n

    def read(self, key: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes of `key` from `offset`; b"" when it does not exist (yet)."""
        try:
            with open(self.local_path(key), "rb") as f:
                f.seek(offset)
                return f.read(-1 if limit is None else limit)
        except FileNotFoundError:
            return b""

    def tail(self, key: str, lines: int) -> list[str]:
        """The last `lines` lines of a text blob (read from the end, however large it is)."""
        try:
            size = self.local_path(key).stat().st_size
        except FileNotFoundError:
            return []
        text = self.read(key, max(0, size - 64 * 1024)).decode("utf-8", "replace")
        return text.splitlines()[-lines:] if lines > 0 else []


class LogWriter:
    """Appends one attempt's output to its log, creating the file on the first write.

    An attempt that prints nothing leaves no file (and costs no file creation, which on
    some filesystems is the most expensive step of a short job).
    """

    __slots__ = ("_blobs", "_fd", "key", "written")

    def __init__(self, blobs: Blobs, key: str) -> None:
        self._blobs, self.key = blobs, key
        self._fd = -1
        self.written = False

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self._fd = self._blobs._create(self.key)
            self.written = True
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
