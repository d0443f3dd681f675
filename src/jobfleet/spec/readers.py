"""Job-file readers: CSV/TSV, JSON, JSON Lines and YAML files, and the `--each` quick form.

Every reader yields validated JobSpecs and raises SpecError naming the file, the line and the
column of the first problem. `read_jobs` reads the whole file before returning, so a bad row
anywhere means no jobs at all; `iter_jobs` streams (for callers that submit inside one
transaction and roll back on error).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from shlex import quote
from typing import Any, TextIO

from jobfleet.errors import SpecError
from jobfleet.spec.build import EMPTY, Layer, fill_paths, finish, finish_layer, layer
from jobfleet.spec.loaders import json_line, load_json, load_yaml
from jobfleet.spec.model import _ENV_NAME, ENV_PREFIX, RESERVED, JobSpec, make_job
from jobfleet.spec.template import compile_template

__all__ = ["each_jobs", "iter_jobs", "read_jobs"]

_PATHS = ("outputs", "workdir")
_Reader = Callable[[TextIO, str, Layer], Iterator[JobSpec]]


def read_jobs(path: str | Path, *, defaults: Mapping[str, Any] | None = None) -> list[JobSpec]:
    """All jobs of a job file, fully validated; SpecError (file:line: column) otherwise.

    `defaults` are the lowest layer: reserved fields (``cpus``, ``outputs``...), ``command``
    (a template), ``env`` (a mapping) and parameters; the file's values override them.
    """
    return list(iter_jobs(path, defaults=defaults))


def iter_jobs(path: str | Path, *, defaults: Mapping[str, Any] | None = None) -> Iterator[JobSpec]:
    """Jobs of a job file one by one, the reader chosen by extension; see `read_jobs`.

    Jobs before a bad one have already been yielded when the error is raised.
    """
    source = str(path)
    reader = _READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise SpecError(f"cannot tell the format of a '{Path(path).suffix}' file", source=source,
                        hint=f"use one of: {', '.join(sorted(_READERS))}")
    base = _defaults(defaults)
    count = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for job in reader(f, source, base):
                count += 1
                yield job
    except OSError as e:
        raise SpecError(f"cannot read the job file: {e.strerror or e}", source=source) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"the file is not UTF-8 text ({e.reason})", source=source,
                        hint="save it as UTF-8 (in a spreadsheet: CSV UTF-8)") from None
    if not count:
        raise SpecError(f"no jobs in {source}",
                        hint="a table needs a header row and one row per job; JSON/YAML files "
                        "list jobs under 'jobs:' (or as a top-level list)")


def each_jobs(
    template: str, args: Iterable[str], *, defaults: Mapping[str, Any] | None = None
) -> list[JobSpec]:
    """One job per argument: ``{}`` in `template` is the argument, shell-quoted; without ``{}``
    the quoted argument is appended, as xargs does (``jobfleet run --each 'gzip -k {}' *.txt``)."""
    source = "--each"
    base = _defaults(defaults)
    t = compile_template(template, source=source)
    jobs: list[JobSpec] = []
    for n, arg in enumerate(args, 1):
        written = {**base.written, "": arg}
        command = t(written, source=source)
        if "" not in t.names:
            command = f"{command} {quote(arg)}"
        params = {**base.params, "": arg}
        jobs.append(finish(command, base.fields, base.env, params, written,
                           source=f"{source} argument {n}", line=None))
    if not jobs:
        raise SpecError("no jobs: --each was given no arguments",
                        hint="list the inputs after the command, e.g. --each 'gzip {}' *.txt")
    return jobs


def _defaults(defaults: Mapping[str, Any] | None) -> Layer:
    if not defaults:
        return EMPTY
    return layer(defaults, source="defaults", line=None, check=True)


# --- CSV / TSV ----------------------------------------------------------------------------


def _read_csv(f: TextIO, source: str, base: Layer) -> Iterator[JobSpec]:
    return _read_table(f, source, base, csv.reader(f, strict=True))


def _read_tsv(f: TextIO, source: str, base: Layer) -> Iterator[JobSpec]:
    return _read_table(f, source, base, csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _next_row(reader: Any, source: str) -> tuple[int, list[str]] | None:
    """The next non-blank row and the physical line it starts on (None at the end)."""
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return None
        except csv.Error as e:
            raise SpecError(f"not valid CSV: {e}", source=source, line=line,
                            hint="a quote inside a quoted cell is written twice: \"\"") from None
        if any(row):
            return line, row


def _read_table(f: TextIO, source: str, base: Layer, reader: Any) -> Iterator[JobSpec]:
    first = _next_row(reader, source)
    if first is None:
        return
    header_line, header = first
    names = _check_header([h.strip() for h in header], source, header_line, base)
    width = len(names)
    command_at = names.index("command") if "command" in names else None
    reserved = [(n, i) for i, n in enumerate(names) if n in RESERVED and n != "command"]
    env_cols = [(n[len(ENV_PREFIX):], i) for i, n in enumerate(names) if n.startswith(ENV_PREFIX)]
    param_names = tuple(dict.fromkeys(
        [*base.params, *(n for n in names if n not in RESERVED and not n.startswith(ENV_PREFIX))]
    ))
    # columns whose blank cells fall back to a default value in the template namespace
    defaulted = [(n, base.written[n]) for n in names if n in base.written]
    base_fields, base_env, base_command, base_written = (
        base.fields, base.env, base.command, base.written)
    templated_paths = any(n in _PATHS for n, _ in reserved) or any(
        k in base_fields for k in _PATHS)
    last_cell, last_template = None, None  # rows mostly share their command template

    while (nxt := _next_row(reader, source)) is not None:
        line, row = nxt
        if len(row) != width:
            _fit(row, width, source, line)
        written = dict(zip(names, row, strict=True))
        if base_written:
            written = {**base_written, **written}
            for n, v in defaulted:
                if not written[n]:
                    written[n] = v
        if base_fields:
            fields = dict(base_fields)
            for n, i in reserved:
                if row[i].strip():
                    fields[n] = row[i]
        else:
            fields = {n: row[i] for n, i in reserved}
        env = {n: row[i] for n, i in env_cols if row[i]} if env_cols else {}
        if base_env:
            env = {**base_env, **env}
        cell = row[command_at] if command_at is not None else ""
        if not cell.strip():
            if base_command is None:
                raise SpecError("the job has no command", source=source, line=line,
                                column="command", hint="fill the cell, or give a default command")
            command = base_command(written, source=source, line=line)
        elif "{" in cell or "}" in cell:
            if cell != last_cell or last_template is None:
                last_cell, last_template = cell, compile_template(cell, source=source, line=line)
            command = last_template(written, source=source, line=line)
        else:
            command = cell
        if templated_paths:
            fields = fill_paths(fields, written, source=source, line=line)
        yield make_job(command, fields, env, {n: written[n] for n in param_names},
                       source=source, line=line)


def _fit(row: list[str], width: int, source: str, line: int) -> None:
    """Pad a short row with blank cells; drop blank extra cells; refuse other extra cells."""
    if len(row) < width:
        row += [""] * (width - len(row))
    elif any(cell.strip() for cell in row[width:]):
        raise SpecError(f"this row has {len(row)} cells but the header has {width}",
                        source=source, line=line,
                        hint="quote cells that contain the separator, or add a column")
    else:
        del row[width:]


def _check_header(names: list[str], source: str, line: int, base: Layer) -> list[str]:
    seen: set[str] = set()
    for i, name in enumerate(names, 1):
        if not name:
            raise SpecError(f"column {i} of the header has no name", source=source, line=line,
                            hint="name every column, or delete the empty one")
        if name in seen:
            raise SpecError("this column appears twice in the header", source=source, line=line,
                            column=name, hint="rename or remove one of them")
        seen.add(name)
        if name == "env":
            raise SpecError("an environment column is named env.NAME", source=source, line=line,
                            column=name, hint="e.g. env.OMP_NUM_THREADS")
        if name.startswith(ENV_PREFIX) and not _ENV_NAME.match(name[len(ENV_PREFIX):]):
            raise SpecError(f"'{name[len(ENV_PREFIX):]}' is not a valid environment variable name",
                            source=source, line=line, column=name,
                            hint="use letters, digits and _, not starting with a digit")
    if "command" not in seen and base.command is None:
        raise SpecError("the header has no 'command' column", source=source, line=line,
                        hint="add a 'command' column (a template such as 'gzip -k {file}'), "
                        "or give a default command")
    return names


# --- JSON / JSON Lines / YAML --------------------------------------------------------------


def _read_json(f: TextIO, source: str, base: Layer) -> Iterator[JobSpec]:
    return _read_document(load_json(f.read(), source=source), source, base)


def _read_yaml(f: TextIO, source: str, base: Layer) -> Iterator[JobSpec]:
    return _read_document(load_yaml(f.read(), source=source), source, base)


def _read_jsonl(f: TextIO, source: str, base: Layer) -> Iterator[JobSpec]:
    for n, text in enumerate(f, 1):
        if not text.strip():
            continue
        record = json_line(text, source=source, line=n)
        if not isinstance(record, Mapping):
            raise SpecError(f"each line must be a JSON object, not {_kind(record)}",
                            source=source, line=n)
        yield finish_layer(layer(record, base, source=source, line=n), source=source, line=n)


def _read_document(data: Any, source: str, base: Layer) -> Iterator[JobSpec]:
    """A top-level list of jobs, or a mapping of defaults with the jobs under jobs:/groups:."""
    if data is None:
        return
    key = "jobs"
    if isinstance(data, list):
        jobs: Any = data
    elif isinstance(data, Mapping):
        line = getattr(data, "line", None)
        lines = getattr(data, "lines", {})
        if "jobs" in data and "groups" in data:
            raise SpecError("give the jobs under 'jobs' or 'groups', not both", source=source,
                            line=lines.get("groups", line), column="groups")
        key = "groups" if "groups" in data else "jobs"
        jobs = data.get(key)
        base = layer(data, base, source=source, line=line, lines=lines,
                     skip=("jobs", "groups"), check=True)
        if jobs is not None and not isinstance(jobs, list):
            raise SpecError(f"'{key}' must be a list of jobs, not {_kind(jobs)}", source=source,
                            line=lines.get(key, line), column=key)
    else:
        raise SpecError(f"the file holds {_kind(data)}; expected a mapping with 'jobs:' or a "
                        "list of jobs", source=source)
    item_lines = getattr(jobs, "lines", None)
    for i, item in enumerate(jobs or ()):
        line = getattr(item, "line", None) or (item_lines[i] if item_lines else None)
        where = None if line else f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise SpecError(f"a job must be a mapping of fields, not {_kind(item)}",
                            source=source, line=line, column=where)
        job = layer(item, base, source=source, line=line, lines=getattr(item, "lines", None))
        yield finish_layer(job, source=source, line=line)


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else f"the value {str(value)[:40]!r}"


_READERS: dict[str, _Reader] = {
    ".csv": _read_csv, ".tsv": _read_tsv, ".tab": _read_tsv, ".json": _read_json,
    ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".yaml": _read_yaml, ".yml": _read_yaml,
}
