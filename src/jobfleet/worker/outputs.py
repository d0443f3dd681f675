"""Declared outputs: whether a job's files already exist (skip-if-done) or went missing."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable


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
