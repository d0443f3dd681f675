"""The blob store: payloads, results, per-attempt logs and declared outputs, by key.

`open_blobs(url)` opens a local folder (a path or `file://PATH`: `LocalBlobs`, files written
directly) or any other URL through fsspec (`s3://bucket/prefix`: `FsspecBlobs`, which needs
the `jobfleet[s3]` extra). Both have the `Blobs` interface (see base.py).
"""

from __future__ import annotations

from pathlib import Path

from jobfleet.blobs.base import BlobError, Blobs, LogWriter, log_key, mask_url, outputs_prefix
from jobfleet.blobs.local import LocalBlobs

__all__ = ["BlobError", "Blobs", "LocalBlobs", "LogWriter", "log_key", "mask_url", "open_blobs",
           "outputs_prefix"]


def open_blobs(url: str | Path) -> Blobs:
    """The blob store at `url`: a folder, `file://PATH`, or a URL such as `s3://bucket/prefix`.

    A remote store is checked as it opens (a missing bucket is a ConfigError now, not a failure
    of every job later); fsspec and s3fs are imported only then.
    """
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return LocalBlobs(text)
    if scheme.lower() == "file":
        return LocalBlobs(rest)
    from jobfleet.blobs.remote import open_remote

    return open_remote(text)
