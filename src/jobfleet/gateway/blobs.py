"""`GatewayBlobs`: the blob store as a jobfleet server offers it to its workers and clients
(which of its keys a token may read or write is the server's to say)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from jobfleet.blobs.base import Blobs, LogWriter
from jobfleet.blobs.local import PARTIAL
from jobfleet.errors import NotFound
from jobfleet.gateway.client import Session
from jobfleet.gateway.logs import GatewayLogWriter, PendingLogs

_PIECE = 1024 * 1024


class GatewayBlobs(Blobs):
    """Blobs read and written through the server at `session.url`."""

    def __init__(self, session: Session, logs: PendingLogs) -> None:
        self._s, self._logs = session, logs
        self.url = self.location = f"{session.url} (blobs)"

    @staticmethod
    def _path(key: str) -> str:
        return "/v1/blobs/" + key.strip("/")  # quoted by the session

    def log_writer(self, key: str) -> LogWriter:
        return GatewayLogWriter(self._s, self._logs, key)

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        found = self._s.json("GET", self._path(key), params={"stat": 1})["size"]
        return None if found is None else int(found)

    def put(self, key: str, data: bytes) -> None:
        self._s.request("PUT", self._path(key), content=data)

    def put_file(self, key: str, path: str | Path) -> int:
        size = os.path.getsize(path)

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while piece := f.read(_PIECE):
                    yield piece

        self._s.request("PUT", self._path(key), content=body(), on_retry=body)
        return size

    def get_file(self, key: str, path: str | Path) -> int:
        dest = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        partial = f"{dest}.{os.getpid()}{PARTIAL}"
        try:
            size = self.size(key)
            if size is None:
                raise FileNotFoundError(f"{key} is not in the blob store {self.url}")
            with open(partial, "wb") as f:
                at = 0
                while at < size:
                    piece = self.read(key, at, min(_PIECE * 8, size - at))
                    if not piece:
                        break
                    f.write(piece)
                    at += len(piece)
            os.replace(partial, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        return at

    def read(self, key: str, offset: int = 0, limit: int | None = None) -> bytes:
        params: dict[str, int] = {"offset": offset}
        if limit is not None:
            params["limit"] = limit
        try:
            return self._s.request("GET", self._path(key), params=params).content
        except NotFound:
            return b""

    def find(self, prefix: str) -> list[tuple[str, int]]:
        found = self._s.json("GET", "/v1/blobs", params={"prefix": prefix})["blobs"]
        return [(str(k), int(n)) for k, n in found]

    def delete_prefix(self, prefix: str) -> int:
        return int(self._s.json("DELETE", "/v1/blobs", params={"prefix": prefix})["deleted"])
