"""Declared outputs: whether a job's files already exist (skip-if-done) or went missing, and
their upload to the blob store (`outputs/RUN/SEQ/<path>`) once the job has succeeded."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from jobfleet.blobs import outputs_prefix

if TYPE_CHECKING:
    from jobfleet.blobs import Blobs

_WILDCARDS = frozenset("*?[")


def _matches(pattern: str, workdir: str) -> list[str]:
    return glob.glob(os.path.join(workdir, os.path.expanduser(pattern)), recursive=True)


def outputs_done(patterns: Iterable[str], workdir: str, min_size: int = 0) -> bool:
    """True when every glob matches at least one file, each at least `min_size` bytes."""
    for pattern in patterns:
        found = _matches(pattern, workdir)
        if not found:
            return False
        for path in found:
            try:
                if os.path.getsize(path) < min_size:
                    return False
            except OSError:
                return False
    return True


def missing_outputs(patterns: Iterable[str], workdir: str) -> list[str]:
    """The globs that match nothing."""
    return [p for p in patterns if not _matches(p, workdir)]


def output_files(patterns: Iterable[str], workdir: str) -> dict[str, str]:
    """The files the globs match (a matched folder: every file in it), each with the name it
    gets among the job's outputs: its path relative to `workdir`, or, outside `workdir`,
    relative to the pattern's folder before its first wildcard (`/data/out/*.csv` → `a.csv`)."""
    found: dict[str, str] = {}
    for pattern in patterns:
        base = _fixed_folder(os.path.join(workdir, os.path.expanduser(pattern)))
        for match in _matches(pattern, workdir):
            for path in _files(match):
                found.setdefault(_name(path, workdir, base), path)
    return found


def upload_outputs(blobs: Blobs, run_id: str, seq: int, patterns: Iterable[str],
                   cwd: str) -> list[str]:
    """Store the files the job's output globs match under `outputs/RUN/SEQ/<name>` (names as
    in `output_files`); returns their keys. An OSError (a BlobError too) means not all are
    stored: the caller decides whether that fails the attempt."""
    prefix = outputs_prefix(run_id, seq)
    keys = []
    for name, path in sorted(output_files(patterns, cwd).items()):
        key = f"{prefix}/{name}"
        blobs.put_file(key, path)
        keys.append(key)
    return keys


def _files(match: str) -> list[str]:
    """`match` itself when it is a file, else the files under it."""
    if not os.path.isdir(match):
        return [match] if os.path.isfile(match) else []
    return sorted(os.path.join(folder, name)
                  for folder, _, names in os.walk(match) for name in names)


def _fixed_folder(pattern: str) -> str:
    """The longest folder of `pattern` without wildcards (`/a/b` for `/a/b/*/c.txt`)."""
    parts = os.path.normpath(pattern).split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if _WILDCARDS & set(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.sep


def _name(path: str, workdir: str, base: str) -> str:
    """The name a file gets among the outputs: relative to `workdir`, else to `base`."""
    path = os.path.normpath(os.path.abspath(path))
    for folder in (workdir, base, os.path.dirname(path)):
        rel = os.path.relpath(path, os.path.abspath(folder))
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            return rel.replace(os.sep, "/")
    return os.path.basename(path)  # not reached: a file is always inside its own folder
