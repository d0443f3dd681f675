"""Declared outputs: whether a job's files already exist (skip-if-done) or went missing, and
their upload to the blob store (`outputs/RUN/SEQ/<path>`) once the job has succeeded.

Only files inside the job's folder are stored: a glob that climbs out (`../x`, an absolute
path elsewhere) or a symlink pointing out matches nothing that is copied, so a job file cannot
make a worker copy its machine's files (`/etc/shadow`, another job's workspace) into the blob
store, where the dashboard and `jobfleet results` would serve them.
"""

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
    # glob answers `a/**` with `a/` even where there is no `a`: keep what exists
    return [path for path in glob.glob(os.path.join(workdir, os.path.expanduser(pattern)),
                                       recursive=True) if os.path.lexists(path)]


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
    """The globs that match nothing in `workdir` (said so when they point outside it)."""
    missing = []
    for pattern in patterns:
        if not _within(pattern, workdir):
            missing.append(f"{pattern} (outside the job's folder {workdir}, not stored)")
        elif not (found := _matches(pattern, workdir)):
            missing.append(pattern)
        elif not any(_inside(path, workdir) for path in found):
            missing.append(f"{pattern} (links outside the job's folder {workdir}, not stored)")
    return missing


def _inside(path: str, folder: str) -> bool:
    """Whether `path`, symlinks resolved, lies in `folder` (symlinks resolved too)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _within(pattern: str, workdir: str) -> bool:
    """Whether the folder of `pattern` before its first wildcard lies in `workdir`: a glob that
    climbs out (`../x`, `/etc/*`) is not even looked for."""
    return _inside(_fixed_folder(os.path.join(workdir, os.path.expanduser(pattern))), workdir)


def output_files(patterns: Iterable[str], workdir: str) -> dict[str, str]:
    """The files in `workdir` the globs match (a matched folder: every file in it), each with
    the name it gets among the job's outputs, its path relative to `workdir`.

    Nothing outside `workdir` is listed: not through a glob that climbs out of it, nor a
    symlink that points out (symlinks are resolved).
    """
    found: dict[str, str] = {}
    for pattern in patterns:
        if not _within(pattern, workdir):
            continue
        for match in _matches(pattern, workdir):
            if not _inside(match, workdir):
                continue
            for path in _files(match):
                if _inside(path, workdir):
                    found.setdefault(_name(path, workdir), path)
    return found


def upload_outputs(blobs: Blobs, run_id: str, seq: int, patterns: Iterable[str],
                   cwd: str) -> list[str]:
    """Store the files the job's output globs match in `cwd` under `outputs/RUN/SEQ/<name>`
    (see `output_files`); returns their keys. An OSError (a BlobError too) means not all are
    stored: the caller decides whether that fails the attempt."""
    prefix = outputs_prefix(run_id, seq)
    keys = []
    for name, path in sorted(output_files(patterns, cwd).items()):
        key = f"{prefix}/{name}"
        blobs.put_file(key, os.path.realpath(path))
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


def _name(path: str, workdir: str) -> str:
    """The name a file in `workdir` gets among the outputs: its path relative to `workdir`."""
    rel = os.path.relpath(os.path.normpath(os.path.abspath(path)), os.path.abspath(workdir))
    return rel.replace(os.sep, "/")
