"""The local-folder blob store: each key a file under one folder, logs appended with os.write."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jobfleet.blobs.base import Blobs, LogWriter

#: the suffix of a file being written beside its final name, renamed into place when complete
PARTIAL = ".partial"


class LocalBlobs(Blobs):
    """Keys (`logs/RUN/7-1.log`) mapped to files under one folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.location = self._root_text = str(self.root)
        self._made: set[str] = set()

    def __repr__(self) -> str:
        return f"LocalBlobs({self._root_text!r})"

    def local_path(self, key: str) -> Path:
        """The file behind `key`."""
        return self.root / key

    def log_writer(self, key: str) -> LogWriter:
        return LocalLogWriter(self, key)

    def _parent_made(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)

    def _create(self, key: str) -> int:
        path = os.path.join(self._root_text, key)
        self._parent_made(path)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def exists(self, key: str) -> bool:
        return os.path.exists(os.path.join(self._root_text, key))

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically: written beside it, then renamed into place."""
        path = os.path.join(self._root_text, key)
        self._parent_made(path)
        partial = f"{path}.{os.getpid()}{PARTIAL}"
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)

    def put_file(self, key: str, path: str | Path) -> int:
        """Copy `path` beside the blob, then rename it into place."""
        dest = os.path.join(self._root_text, key)
        self._parent_made(dest)
        return _copy_atomically(path, dest)

    def get_file(self, key: str, path: str | Path) -> int:
        try:
            return _copy_atomically(self.local_path(key), path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{key} is not in the blob store {self.url}") from None

    def read(self, key: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes of `key` from `offset`; b"" when it does not exist (yet)."""
        try:
            with open(self.local_path(key), "rb") as f:
                if offset >= os.fstat(f.fileno()).st_size:
                    return b""  # (seeking that far may fail: a client asked for any offset)
                f.seek(offset)
                return f.read(-1 if limit is None else limit)
        except FileNotFoundError:
            return b""

    def size(self, key: str) -> int | None:
        try:
            return self.local_path(key).stat().st_size
        except FileNotFoundError:
            return None

    def find(self, prefix: str) -> list[tuple[str, int]]:
        folder = self.root / prefix
        found = []
        for dirpath, _, names in os.walk(folder):
            for name in names:
                if name.endswith(PARTIAL):
                    continue  # still being written
                path = Path(dirpath, name)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # removed meanwhile
                found.append((path.relative_to(self.root).as_posix(), size))
        return sorted(found)

    def delete_prefix(self, prefix: str) -> int:
        folder = self.root / prefix
        if not folder.is_dir():
            return 0
        n = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return n


def _copy_atomically(source: str | Path, dest: str | Path) -> int:
    """Copy `source` to `dest` through a file beside it, renamed into place; returns the size."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    partial = f"{dest}.{os.getpid()}{PARTIAL}"
    try:
        shutil.copyfile(source, partial)
        size = os.path.getsize(partial)
        os.replace(partial, dest)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return size


class LocalLogWriter(LogWriter):
    """Appends one attempt's output to its log file, creating the file on the first write.

    An attempt that prints nothing leaves no file (and costs no file creation, which on
    some filesystems is the most expensive step of a short job). Nothing is held back.
    A folder that is full or read-only does not stop the job: the rest of its output is
    dropped and `failure` says why.
    """

    __slots__ = ("_blobs", "_fd", "_failure")

    due_at = None

    def __init__(self, blobs: LocalBlobs, key: str) -> None:
        self._blobs, self.key = blobs, key
        self._fd = -1
        self.written = False
        self._failure: str | None = None

    def write(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            if self._fd < 0:
                self._fd = self._blobs._create(self.key)
                self.written = True
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self._failure = f"could not store its log in {self._blobs.url}: {e.strerror or e}"
            self.close()

    def failure(self) -> str | None:
        return self._failure

    def tick(self, now: float) -> None:
        """Nothing is held back."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
