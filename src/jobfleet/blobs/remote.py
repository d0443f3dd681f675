"""Blob stores at URLs (`s3://bucket/prefix`, ...) through fsspec; logs as numbered chunks.

Object stores cannot append, so a log is a folder of chunk objects under its key
(`logs/RUN/7-1.log/000001`, `.../000002`, ...), each written whole while the attempt runs.
Reading a log concatenates its chunks in order; following one reads the chunks that appeared
since. Every other blob is one object, written with one PUT, which readers see whole or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobfleet.blobs.base import BlobError, Blobs, LogWriter
from jobfleet.blobs.local import PARTIAL

log = logging.getLogger("jobfleet.blobs")

#: a log's output is stored as a chunk once this much is held back, bytes ...
CHUNK_SIZE = 1024 * 1024
#: ... or once the oldest byte held back has waited this long, seconds
CHUNK_AGE = 1.0
#: after a chunk could not be stored, how long before the next try, seconds
RETRY_AFTER = 5.0
#: while the store fails, output held back beyond this is dropped (and the loss noted), bytes
MAX_HELD = 64 * 1024 * 1024
#: the digits of a chunk's number (more are used past 999,999 chunks: numbers sort as numbers)
_DIGITS = 6


class FsspecBlobs(Blobs):
    """Keys mapped to objects under `root` (a path in `fs`, e.g. `bucket/prefix`)."""

    def __init__(self, fs: Any, protocol: str, root: str, url: str) -> None:
        self.fs, self.protocol = fs, protocol
        self._root = root.rstrip("/")
        self.url = self.location = url
        self._chunked: set[str] = set()  # keys known to be logs, not single objects

    def __repr__(self) -> str:
        return f"FsspecBlobs({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self._root}/{key.strip('/')}"

    def _key(self, path: str) -> str:
        return path[len(self._root) + 1:]

    @contextlib.contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """Turn the many errors a remote store raises into a BlobError saying what to do;
        FileNotFoundError passes, as the caller decides what a missing blob means."""
        try:
            yield
        except (FileNotFoundError, BlobError):
            raise
        except Exception as e:  # noqa: BLE001  (botocore, aiohttp and OSError alike)
            raise BlobError(f"could not {doing} in the blob store {self.url}: "
                            f"{type(e).__name__}: {e}", hint=failure_hint(e)) from e

    # -- whole objects ----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        with self._io(f"look for {key}"):
            return bool(self.fs.exists(self._path(key)))

    def put(self, key: str, data: bytes) -> None:
        with self._io(f"store {key}"):
            self.fs.pipe_file(self._path(key), data)

    def put_file(self, key: str, path: str | Path) -> int:
        with self._io(f"upload {path} to {key}"):
            self.fs.put_file(os.fspath(path), self._path(key))
        return os.path.getsize(path)

    def get_file(self, key: str, path: str | Path) -> int:
        """Download through a file beside `path`, renamed into place when complete."""
        dest = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        partial = f"{dest}.{os.getpid()}{PARTIAL}"
        try:
            with self._io(f"download {key}"):
                self.fs.get_file(self._path(key), partial)
            size = os.path.getsize(partial)
            os.replace(partial, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        return size

    def read(self, key: str, offset: int = 0, limit: int | None = None) -> bytes:
        if key not in self._chunked:
            end = None if limit is None else offset + limit
            try:
                with self._io(f"read {key}"):
                    return bytes(self.fs.cat_file(self._path(key), start=offset or None, end=end))
            except FileNotFoundError:
                pass  # perhaps a log
            except BlobError as e:
                if offset and _past_end(e):
                    return b""
                raise
        return self._read_chunks(self._chunks(key), offset, limit)

    def size(self, key: str) -> int | None:
        chunks = self._chunks(key) if key in self._chunked else None
        if chunks is None:
            try:
                with self._io(f"look for {key}"):
                    info = self.fs.info(self._path(key))
                if info.get("type") != "directory":
                    return int(info["size"])
            except FileNotFoundError:
                return None
            chunks = self._chunks(key)
        return sum(n for _, n in chunks) if chunks else None

    def find(self, prefix: str) -> list[tuple[str, int]]:
        sizes: dict[str, int] = {}
        for key, size in self._objects(prefix):
            log_of = _log_of(key)
            sizes[log_of or key] = sizes.get(log_of or key, 0) + size
        return sorted(sizes.items())

    def delete_prefix(self, prefix: str) -> int:
        objects = self._objects(prefix)
        if not objects:
            return 0
        blobs = {_log_of(key) or key for key, _ in objects}
        with self._io(f"delete {prefix}"):
            self.fs.rm([self._path(key) for key, _ in objects])
        self._chunked -= blobs
        return len(blobs)

    def _objects(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under the folder `prefix`, chunks one by one."""
        folder = self._path(prefix).rstrip("/")
        try:
            with self._io(f"list {prefix}"):
                found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            return []
        return [(self._key(path), int(info.get("size") or 0)) for path, info in found.items()
                if path.startswith(folder + "/") and info.get("type") != "directory"]

    # -- logs -------------------------------------------------------------------------------
    def log_writer(self, key: str) -> LogWriter:
        return ChunkedLogWriter(self, key)

    def put_chunk(self, key: str, number: int, data: bytes) -> None:
        """Store chunk `number` (from 1) of the log `key`."""
        self.put(f"{key}/{number:0{_DIGITS}d}", data)

    def _chunks(self, key: str) -> list[tuple[str, int]]:
        """(path, size) of the chunks of log `key`, in order; [] when it has none."""
        try:
            with self._io(f"list the chunks of {key}"):
                listed = self.fs.ls(self._path(key), detail=True)
        except FileNotFoundError:
            return []
        chunks = sorted((int(name), info["name"], int(info.get("size") or 0))
                        for info in listed
                        if (name := info["name"].rstrip("/").rpartition("/")[2]).isdigit())
        if chunks:
            self._chunked.add(key)
        return [(path, size) for _, path, size in chunks]

    def _read_chunks(self, chunks: list[tuple[str, int]], offset: int, limit: int | None) -> bytes:
        """Bytes from `offset` (at most `limit`) of the log made of `chunks`; only the chunks
        that hold some of them are fetched (together)."""
        end = None if limit is None else offset + limit
        wanted: list[str] = []
        at = skip = 0
        for path, size in chunks:
            if at + size > offset and (end is None or at < end):
                if not wanted:
                    skip = offset - at
                wanted.append(path)
            at += size
        if not wanted:
            return b""
        with self._io(f"read {len(wanted)} log chunks under {self._key(wanted[0])}"):
            got = self.fs.cat(wanted, on_error="raise")
        data = b"".join(bytes(got[path]) for path in wanted)[skip:]
        return data if limit is None else data[:limit]


def _log_of(key: str) -> str | None:
    """The log a chunk's key belongs to (`logs/R/7-1.log` for `logs/R/7-1.log/000003`)."""
    folder, _, name = key.rpartition("/")
    is_chunk = name.isdigit() and folder.endswith(".log") and folder.startswith("logs/")
    return folder if is_chunk else None


def _past_end(e: BlobError) -> bool:
    """Was this a read that started past the end of an object (HTTP 416)?"""
    cause = e.__cause__
    return (isinstance(cause, OSError) and cause.errno == 22) or "416" in str(cause)


def failure_hint(e: BaseException) -> str:
    """What to do about a failure of a remote store, guessed from the error."""
    name, text = type(e).__name__, str(e)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return ("give AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE,"
                " or ~/.aws/credentials")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return "check that these credentials may read and write that bucket and prefix"
    if "Connect" in name or "Endpoint" in name or "Timeout" in name:
        return "check the network, and AWS_ENDPOINT_URL if the store is not AWS itself"
    return "check the URL, the credentials and the network; then try again"


class ChunkedLogWriter(LogWriter):
    """Holds an attempt's output back and stores it as numbered chunks under its log key: once
    CHUNK_SIZE bytes wait, when `tick` finds the oldest has waited CHUNK_AGE, and at `close`.

    A chunk that cannot be stored is kept and tried again RETRY_AFTER later: a blob store that
    is down for a while costs a job's log, never the job (the failure is logged).
    """

    __slots__ = ("_blobs", "_held", "_next", "_retry_at", "_dropped", "due_at")

    def __init__(self, blobs: FsspecBlobs, key: str) -> None:
        self._blobs, self.key = blobs, key
        self._held = bytearray()
        self._next = 1
        self._retry_at = 0.0  # while failing, no chunk is tried before this
        self._dropped = 0  # bytes lost while the store failed
        self.written = False
        self.due_at: float | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.written = True
        if not self._held:
            self.due_at = max(time.monotonic() + CHUNK_AGE, self._retry_at)
        self._held += data
        if len(self._held) >= CHUNK_SIZE:
            now = time.monotonic()
            if now >= self._retry_at:
                self.flush(now)
            elif len(self._held) > MAX_HELD:
                self._dropped += len(self._held)
                self._held.clear()

    def tick(self, now: float) -> None:
        if self.due_at is not None and now >= self.due_at:
            self.flush(now)

    def flush(self, now: float | None = None) -> bool:
        """Store what is held back as the next chunk; False if the store refused it."""
        if not self._held and not self._dropped:
            return True
        data = bytes(self._held)
        if self._dropped:
            data = (b"\n[jobfleet: %d bytes of output lost: the blob store failed]\n"
                    % self._dropped) + data
        try:
            self._blobs.put_chunk(self.key, self._next, data)
        except BlobError as e:
            self._retry_at = (now or time.monotonic()) + RETRY_AFTER
            self.due_at = self._retry_at
            log.warning("log %s: chunk %d not stored, trying again in %gs: %s", self.key,
                        self._next, RETRY_AFTER, e.message, extra={"action": "log_chunk_failed"})
            return False
        self._next += 1
        self._held.clear()
        self._dropped = 0
        self._retry_at = 0.0
        self.due_at = None
        return True

    def close(self) -> None:
        """Store the rest now (one try: the attempt is over and its outcome must not wait)."""
        if (self._held or self._dropped) and not self.flush():
            log.error("log %s: the last %d bytes were lost: the blob store failed", self.key,
                      len(self._held), extra={"action": "log_lost"})
            self._held.clear()
        self.due_at = None


# -- opening ----------------------------------------------------------------------------------
_S3 = ("s3", "s3a")
_NO_CREDENTIALS_IN_URLS = (
    "put no credentials in the URL: give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,"
    " AWS_PROFILE or ~/.aws/credentials (or the store's own configuration for other schemes)")


def open_remote(url: str) -> FsspecBlobs:
    """The blob store at `url`, checked to exist (for S3: the bucket, with one request)."""
    from urllib.parse import urlsplit

    from jobfleet.blobs.base import mask_url
    from jobfleet.errors import ConfigError

    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigError(f"the blob store URL {mask_url(url)} is not valid: {e}",
                          hint="e.g. --blobs s3://my-bucket/jobfleet, or a folder") from None
    protocol = parts.scheme.lower()
    if parts.password is not None or (protocol in _S3 and parts.username is not None):
        raise ConfigError(f"the blob store URL {mask_url(url)} holds credentials",
                          hint=_NO_CREDENTIALS_IN_URLS)
    if not parts.netloc:
        raise ConfigError(f"the blob store URL {url} names no bucket or host",
                          hint=f"e.g. {protocol}://my-bucket/jobfleet")
    url = protocol + url[len(parts.scheme):]  # S3://... as s3://...
    fs = _filesystem(protocol, url)
    root = str(fs._strip_protocol(url)).rstrip("/")
    blobs = FsspecBlobs(fs, protocol, root, mask_url(f"{protocol}://{root}"))
    if protocol in _S3:
        _check_bucket(blobs, parts.netloc)
    return blobs


def _filesystem(protocol: str, url: str) -> Any:
    """A fresh fsspec filesystem for `protocol` (no listing cache: logs grow while followed)."""
    from jobfleet.errors import ConfigError

    extra = "jobfleet[s3]" if protocol in _S3 else None
    try:
        import fsspec

        return fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False,
                                 **(s3_options() if protocol in _S3 else {}))
    except ImportError as e:
        raise ConfigError(
            f"the blob store {url} needs a package that is not installed: {e}",
            hint=f"install {extra} (pip install '{extra}')" if extra
            else f"install fsspec and the package for {protocol}:// URLs") from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise ConfigError(f"the blob store {url} has a scheme jobfleet does not know: {e}",
                          hint="use a folder, file://PATH or s3://BUCKET/PREFIX") from None


def s3_options() -> dict[str, Any]:
    """s3fs options from the environment: the endpoint of an S3-compatible service, if any
    (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL). Credentials stay with botocore's own chain."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def _check_bucket(blobs: FsspecBlobs, bucket: str) -> None:
    """Refuse a store whose bucket is missing now, rather than fail every job later."""
    from jobfleet.errors import ConfigError

    try:
        with blobs._io(f"reach the bucket '{bucket}'"):
            blobs.fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        endpoint = s3_options().get("client_kwargs", {}).get("endpoint_url")
        where = f" at {endpoint}" if endpoint else ""
        raise ConfigError(f"the blob store {blobs.url}: bucket '{bucket}' does not exist{where}",
                          hint=f"create it (aws s3 mb s3://{bucket}) or fix the URL") from None
