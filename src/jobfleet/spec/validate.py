"""Whole-file validation: every bad row of a job file, not just the first (`jobfleet validate`).

The readers stop at the first problem, which is right for submitting (nothing is enqueued
anyway). To list them all, a clean file is read once the normal way; a file with problems
is read again, and after each problem the reader carries on with the next row:

- CSV/TSV: the same csv reader goes on after the bad row, with the header replayed in front;
- JSON Lines: each line is a job of its own;
- JSON/YAML: the file's defaults are checked once, then each job under `jobs:`/`groups:`.

A problem in what every row depends on (the header, the defaults, the file's syntax) ends
the reading: the rows after it cannot be judged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jobfleet.errors import SpecError
from jobfleet.spec.build import Layer, finish_layer, layer
from jobfleet.spec.loaders import Located, LocatedList, json_line, load_json, load_yaml
from jobfleet.spec.readers import (
    _READERS,
    _defaults,
    _next_row,
    _read_document,
    _read_table,
    iter_jobs,
)

__all__ = ["validate_jobs"]

#: stop listing after this many problems (a file of 100,000 bad rows says enough by then)
MAX_PROBLEMS = 1000


def validate_jobs(path: str | Path, *, defaults: Mapping[str, Any] | None = None,
                  limit: int = MAX_PROBLEMS) -> tuple[int, list[SpecError]]:
    """(how many jobs are valid, every problem found, in file order, at most `limit`)."""
    try:
        return sum(1 for _ in iter_jobs(path, defaults=defaults)), []
    except SpecError as first:
        suffix = Path(path).suffix.lower()
        if suffix not in _READERS:
            return 0, [first]
        try:
            base = _defaults(defaults)
            with open(path, encoding="utf-8-sig", newline="") as f:
                count, problems = _collect(f.read(), suffix, str(path), base, limit)
        except (SpecError, OSError, UnicodeDecodeError):  # the first problem says why
            return 0, [first]
        return count, problems or [first]  # (`no jobs` is raised only by iter_jobs)


def _collect(text: str, suffix: str, source: str, base: Layer, limit: int
             ) -> tuple[int, list[SpecError]]:
    count, problems = 0, []
    if suffix in (".csv", ".tsv", ".tab"):
        results = _table(text, source, base, tsv=suffix != ".csv")
    elif suffix in (".jsonl", ".ndjson"):
        results = _lines(text, source, base)
    else:
        data = (load_json if suffix == ".json" else load_yaml)(text, source=source)
        results = _document(data, source, base)
    for problem in results:
        if problem is None:
            count += 1
        else:
            problems.append(problem)
            if len(problems) >= limit:
                break
    return count, problems


# each helper yields None for a valid job and the SpecError of a bad one


def _table(text: str, source: str, base: Layer, *, tsv: bool) -> Iterator[SpecError | None]:
    f = io.StringIO(text, newline="")
    raw = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
           else csv.reader(f, strict=True))
    try:
        first = _next_row(raw, source)
    except SpecError as e:
        yield e
        return
    if first is None:
        return
    header_line, header = first
    while True:
        at = raw.line_num
        try:
            for _ in _read_table(f, source, base, _Replay(raw, header, header_line)):
                yield None
            return
        except SpecError as e:
            yield e
            if e.line is None or e.line <= header_line or raw.line_num == at:
                return  # the header is wrong (or nothing was read): no row can be judged


class _Replay:
    """A csv reader that gives the header row again, then goes on where it stopped."""

    def __init__(self, reader: Any, header: list[str], header_line: int) -> None:
        self._reader, self._header, self._header_line = reader, header, header_line
        self._replayed = False

    @property
    def line_num(self) -> int:
        return self._reader.line_num if self._replayed else self._header_line - 1

    def __iter__(self) -> _Replay:
        return self

    def __next__(self) -> list[str]:
        if not self._replayed:
            self._replayed = True
            return self._header
        row: list[str] = next(self._reader)
        return row


def _lines(text: str, source: str, base: Layer) -> Iterator[SpecError | None]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json_line(line, source=source, line=n)
            if not isinstance(record, Mapping):
                raise SpecError("each line must be a JSON object", source=source, line=n)
            finish_layer(layer(record, base, source=source, line=n), source=source, line=n)
        except SpecError as e:
            yield e
        else:
            yield None


def _document(data: Any, source: str, base: Layer) -> Iterator[SpecError | None]:
    """The file's defaults first (with no jobs), then each job with those defaults."""
    if isinstance(data, Mapping):
        key = "groups" if "groups" in data else "jobs"
        items = data.get(key)
        skeleton: Any = _with_jobs(data, key, [])
    else:
        items, skeleton = data, []
    try:
        for _ in _read_document(skeleton, source, base):
            pass
    except SpecError as e:
        yield e
        return
    if not isinstance(items, list):
        yield from _rest(_read_document(data, source, base))
        return
    lines = getattr(items, "lines", None)
    for i, item in enumerate(items):
        one = [item] if lines is None else LocatedList([item], [lines[i]])
        only = _with_jobs(data, key, one) if isinstance(data, Mapping) else one
        yield from _rest(_read_document(only, source, base))


def _rest(jobs: Iterator[Any]) -> Iterator[SpecError | None]:
    try:
        for _ in jobs:
            yield None
    except SpecError as e:
        yield e


def _with_jobs(data: Mapping[str, Any], key: str, jobs: list[Any]) -> Located:
    """A copy of the top-level mapping `data` with `jobs` under `key`, lines kept."""
    out = Located()
    out.update(data)
    out[key] = jobs
    out.line = getattr(data, "line", None)
    out.lines = dict(getattr(data, "lines", {}))
    return out
