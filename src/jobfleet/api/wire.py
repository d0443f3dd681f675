"""How Python calls and their results travel: pickled, inline in the store or in the blob store.

A stored payload or result is an envelope: `I` + the pickle itself when it is small, or `B` +
a blob key when it is larger than `INLINE_LIMIT`, so big values never bloat the store. The
function of a call is pickled once per distinct function and kept in the blob store under its
digest (`functions/DIGEST.pkl`); each call carries only the digest and its arguments.

Between a worker and its warm interpreters, messages are frames: 4-byte length, then a pickle.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import traceback
from collections.abc import Callable
from typing import Any

from jobfleet.blobs import Blobs

#: what a warm interpreter sends once it has imported what it needs (see api.runner)
READY = "ready"
#: pickles larger than this go to the blob store, bytes
INLINE_LIMIT = 64 * 1024
_LEN = struct.Struct(">I")


def function_key(digest: str) -> str:
    return f"functions/{digest}.pkl"


def dumps(value: object) -> bytes:
    import cloudpickle

    return bytes(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def store_function(blobs: Blobs, fn: object) -> str:
    """Pickle `fn` (by value when it lives in __main__) into the blob store; returns its digest."""
    body = dumps(fn)
    digest = hashlib.sha256(body).hexdigest()[:32]
    key = function_key(digest)
    if not blobs.exists(key):
        blobs.put(key, body)
    return digest


def envelope(blobs: Blobs, data: bytes, key: str) -> bytes:
    """What the store keeps for `data`: the bytes themselves, or where in `blobs` they are."""
    if len(data) <= INLINE_LIMIT:
        return b"I" + data
    blobs.put(key, data)
    return b"B" + key.encode()


def open_envelope(blobs: Blobs, stored: bytes) -> bytes:
    tag, rest = stored[:1], stored[1:]
    if tag == b"I":
        return rest
    if tag == b"B":
        key = rest.decode()
        data = blobs.read(key)
        if not data:
            raise LookupError(f"{key} is missing from the blob store {blobs.url}")
        return data
    raise ValueError(f"not a jobfleet envelope (tag {tag!r})")


def apply_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """What a job of `map(..., chunksize=N)` calls: `fn` on each item's arguments. It lives
    here, not in the executor, so that a warm interpreter unpickling it (by reference) imports
    only this module, not the executor's store and settings (tens of milliseconds)."""
    return [fn(*args) for args in chunk]


# -- results ----------------------------------------------------------------------------------


def ok(value: object) -> bytes:
    """The pickled result of a call that returned `value` (or of the failure to pickle it)."""
    try:
        return dumps(("ok", value))
    except Exception as e:  # noqa: BLE001  (an unpicklable return value fails the call)
        return failure(TypeError(f"the call's result could not be pickled: {e}"))


def failure(exc: BaseException) -> bytes:
    """The pickled failure of a call: the exception when it pickles, and always its text."""
    tb = "".join(traceback.format_exception(exc))
    exc_data: bytes | None
    try:
        exc_data = dumps(exc)
        pickle.loads(exc_data)  # the caller must be able to load it too
    except Exception:  # noqa: BLE001
        exc_data = None
    return dumps(("error", exc_data, type(exc).__qualname__, str(exc), tb))


class RemoteError(Exception):
    """A call failed remotely with an exception that could not be brought back as itself."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.traceback = type_name, message, traceback_text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}\n\nRemote traceback:\n{self.traceback}"


class RemoteTraceback(Exception):
    """The traceback of the remote exception, attached as `__cause__` of the re-raised one."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nRemote traceback:\n{self.text}"


def outcome_value(data: bytes) -> tuple[bool, Any]:
    """(True, value) for a call that returned, (False, exception) for one that raised."""
    record = pickle.loads(data)
    if record[0] == "ok":
        return True, record[1]
    _, exc_data, type_name, message, tb = record
    exc: BaseException | None = None
    if exc_data is not None:
        try:
            exc = pickle.loads(exc_data)
        except Exception:  # noqa: BLE001  (a type this process cannot import)
            exc = None
    if not isinstance(exc, BaseException):
        return False, RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    return False, exc


# -- frames -----------------------------------------------------------------------------------


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def write_frame(fd: int, message: object) -> None:
    data = memoryview(frame(message))
    while data:
        data = data[os.write(fd, data):]


def take_frames(buf: bytearray) -> list[Any]:
    """Remove and return the whole frames at the start of `buf`."""
    found, at = [], 0
    while len(buf) - at >= 4:
        (n,) = _LEN.unpack_from(buf, at)
        if len(buf) - at - 4 < n:
            break
        found.append(pickle.loads(buf[at + 4:at + 4 + n]))
        at += 4 + n
    del buf[:at]
    return found


def read_frame(fd: int) -> Any | None:
    """One frame from a blocking fd; None at end of file."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    body = _read_exactly(fd, n)
    if body is None:
        return None
    return pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
