"""Layering job records over defaults and turning the result into validated JobSpecs.

A *layer* is what one level of a job file says: the defaults passed by the caller, the top
level of a JSON/YAML file, then each job's own object. Later layers override earlier ones; a
null (or, for job fields, blank) value keeps the earlier value; ``env`` mappings merge.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from jobfleet.errors import SpecError
from jobfleet.spec.model import _ENV_NAME, _FIELD_PARSERS, ENV_PREFIX, RESERVED, JobSpec, make_job
from jobfleet.spec.template import Template, compile_template

_LIST_FIELDS = frozenset({"outputs", "retry_on"})
_PATH_FIELDS = ("outputs", "workdir")
_NO_COMMAND_HINT = "give every job a shell command: a 'command' column/key or a default command"


@dataclass(slots=True)
class Layer:
    """Everything known about a job (or the defaults for many jobs) so far."""

    command: Template | None = None
    fields: dict[str, object] = field(default_factory=dict)  # raw reserved values, not command
    env: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    #: the template namespace: parameters plus reserved values as written
    written: dict[str, str] = field(default_factory=dict)


EMPTY = Layer()


def as_text(value: object, *, source: str | None, line: int | None, column: str) -> str | None:
    """Parameter text for a JSON/YAML value: true/false, str() of numbers, None for null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list | tuple | set):
        kind = "mapping" if isinstance(value, Mapping) else "list"
        raise SpecError(f"the value is a {kind}; parameters must be text, numbers or true/false",
                        source=source, line=line, column=column,
                        hint="only 'outputs' and 'retry_on' take lists, only 'env' a mapping")
    return str(value)


def layer(
    record: Mapping[str, object],
    base: Layer = EMPTY,
    *,
    source: str | None,
    line: int | None,
    lines: Mapping[str, int] | None = None,
    skip: Collection[str] = (),
    check: bool = False,
) -> Layer:
    """`record` over `base`. With `check` (or a key on its own line), field values are parsed
    now, so an error points at the key rather than at the first job that uses it."""
    out = Layer(base.command, dict(base.fields), dict(base.env), dict(base.params),
                dict(base.written))
    for key, value in record.items():
        at = lines.get(key, line) if lines else line
        if not isinstance(key, str):
            raise SpecError(f"the key {key!r} is not text", source=source, line=at)
        if key in skip or value is None:
            continue
        if key == "command":
            if isinstance(value, str) and not value.strip():
                continue
            out.command = compile_template(value, source=source, line=at)  # type: ignore[arg-type]
        elif key in RESERVED:
            if _set_field(out, key, value, source=source, line=at) and (check or at != line):
                _check_field(key, value, source=source, line=at)
        elif key == "env":
            if not isinstance(value, Mapping):
                raise SpecError("'env' must be a mapping of NAME: value", source=source,
                                line=at, column="env")
            for name, v in value.items():
                _set_env(out, str(name), v, source=source, line=at)
        elif key.startswith(ENV_PREFIX):
            _set_env(out, key[len(ENV_PREFIX):], value, source=source, line=at)
        else:
            text = as_text(value, source=source, line=at, column=key)
            out.params[key] = out.written[key] = text  # type: ignore[assignment]
    return out


def _set_field(out: Layer, key: str, value: object, *, source: str | None,
               line: int | None) -> bool:
    if isinstance(value, list | tuple):
        if key not in _LIST_FIELDS:
            raise SpecError("this field takes one value, not a list", source=source, line=line,
                            column=key)
        value = [as_text(v, source=source, line=line, column=key) or "" for v in value]
    elif isinstance(value, str) and not value.strip():
        return False
    else:
        as_text(value, source=source, line=line, column=key)  # rejects mappings
    out.fields[key] = value
    if not isinstance(value, list):
        out.written[key] = as_text(value, source=source, line=line, column=key)  # type: ignore[assignment]
    if key in _PATH_FIELDS:
        for part in value if isinstance(value, list) else [value]:
            compile_template(str(part), shell=False, source=source, line=line, column=key)
    return True


def _check_field(key: str, value: object, *, source: str | None, line: int | None) -> None:
    try:
        _FIELD_PARSERS[key](value)
    except ValueError as e:
        raise SpecError(str(e), source=source, line=line, column=key) from None


def _set_env(out: Layer, name: str, value: object, *, source: str | None,
             line: int | None) -> None:
    if not _ENV_NAME.match(name):
        raise SpecError(f"'{name}' is not a valid environment variable name", source=source,
                        line=line, column=ENV_PREFIX + name,
                        hint="use letters, digits and _, not starting with a digit")
    if value is None:
        out.env.pop(name, None)  # null unsets a default
    else:
        out.env[name] = as_text(value, source=source, line=line, column=ENV_PREFIX + name) or ""


def finish(
    command: Template | str | None,
    fields: dict[str, object],
    env: Mapping[str, str],
    params: Mapping[str, str],
    written: Mapping[str, str],
    *,
    source: str | None,
    line: int | None,
) -> JobSpec:
    """Render the command (and templated outputs/workdir) and build the JobSpec."""
    if command is None:
        raise SpecError("the job has no command", source=source, line=line, column="command",
                        hint=_NO_COMMAND_HINT)
    if isinstance(command, Template):
        command = command(written, source=source, line=line)
    fields = fill_paths(fields, written, source=source, line=line)
    return make_job(command, fields, env, params, source=source, line=line)


def finish_layer(job: Layer, *, source: str | None, line: int | None) -> JobSpec:
    return finish(job.command, job.fields, job.env, job.params, job.written,
                  source=source, line=line)


def fill_paths(fields: dict[str, object], written: Mapping[str, str], *, source: str | None,
               line: int | None) -> dict[str, object]:
    """`fields` with the templates in outputs/workdir filled (plain, not shell-quoted)."""
    for key in _PATH_FIELDS:
        value = fields.get(key)
        if value is not None and _has_braces(value):
            fields = dict(fields)
            fields[key] = _fill_path(value, written, source=source, line=line, column=key)
    return fields


def _has_braces(value: object) -> bool:
    if isinstance(value, list):
        return any("{" in v or "}" in v for v in value)
    return "{" in value or "}" in value if isinstance(value, str) else False


def _fill_path(value: object, written: Mapping[str, str], *, source: str | None,
               line: int | None, column: str) -> object:
    def fill(text: str) -> str:
        t = compile_template(text, shell=False, source=source, line=line, column=column)
        return t(written, source=source, line=line, column=column)

    return [fill(v) for v in value] if isinstance(value, list) else fill(str(value))
