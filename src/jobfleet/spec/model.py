"""JobSpec, the validated description of one job, and the parsing of its fields."""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from jobfleet.errors import SpecError

#: columns/keys that set job fields; every other column is a template parameter
RESERVED = frozenset(
    {
        "command", "name", "cpus", "memory", "gpus", "timeout", "max_attempts", "workdir",
        "outputs", "skip_if_done", "min_size", "instance_type", "retry_on", "retry_delay",
        "network", "image", "sandbox", "secret_env", "stall_after", "on_stall",
    }
)
ENV_PREFIX = "env."
#: by default a job is stalled after this long without output or CPU use, seconds (the
#: low-CPU alarm of the hand-built fleets our users come from waited 15 minutes)
STALL_AFTER = 900.0
ON_STALL = ("report", "retry")
#: an `env.NAME` value starting so is read on the submitting side, and kept secret
SECRET_PREFIX = "secret:"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job: a shell command line and how to run it."""

    command: str
    name: str | None = None
    cpus: float = 1.0
    memory: int = 0  # bytes; 0 means "not stated"
    gpus: int = 0
    timeout: float | None = None  # seconds
    max_attempts: int = 3
    workdir: str | None = None
    outputs: tuple[str, ...] = ()
    skip_if_done: bool = False
    min_size: int = 0  # bytes each output must have, with skip_if_done
    instance_type: str | None = None  # placement hint
    retry_on: tuple[int, ...] = ()  # exit codes worth a retry; empty = any failure
    retry_delay: float = 1.0  # first backoff, seconds; doubles per attempt
    env: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    network: bool = False  # asks for network access (sandboxes that cut it off)
    image: str | None = None  # container image, for the container sandbox
    sandbox: str | None = None  # run in this sandbox, where the worker allows it
    secret_env: tuple[str, ...] = ()  # names in `env` whose values are redacted everywhere
    #: a running job with no output and no CPU use for this long is stalled; None: never
    stall_after: float | None = STALL_AFTER
    on_stall: str = "report"  # report: shown as stalled; retry: also killed (a failed attempt)

    def secret_values(self) -> list[str]:
        """The values of the secret variables, longest first (to redact them)."""
        values = {self.env[n] for n in self.secret_env if self.env.get(n)}
        return sorted(values, key=len, reverse=True)

    def to_json(self) -> str:
        """Compact JSON of the fields that differ from their defaults (one per job stored)."""
        rest = _GET_REST(self)
        if rest == _DEFAULT_REST and isinstance(self.command, str):
            # the usual job (a command, maybe env and parameters): no dict of fields to build
            text = '{"command":' + _ENCODE_STR(self.command)
            if self.env:
                text += ',"env":' + _encode_texts(self.env)
            if self.params:
                text += ',"params":' + _encode_texts(self.params)
            return text + "}"
        d = {name: value for name, default in _PLAIN_DEFAULTS
             if (value := getattr(self, name)) != default}
        if self.env:
            d["env"] = dict(self.env)
        if self.params:
            d["params"] = dict(self.params)
        return _ENCODE(d)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        d = json.loads(text)
        for k in ("outputs", "retry_on", "secret_env"):
            if k in d:
                d[k] = tuple(d[k])
        return _new_spec(**d) if cls is JobSpec else cls(**d)



#: every field with its default (`command`, which has none, is always written)
_DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not MISSING else f.default
    for f in fields(JobSpec)
}
_DEFAULTS["command"] = None
#: the same, but the mappings (env, params), which to_json writes when they are not empty
_PLAIN_DEFAULTS = tuple((k, v) for k, v in _DEFAULTS.items() if k not in ("env", "params"))
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_ENCODE_STR = json.encoder.encode_basestring  # what _ENCODE does with a str
#: the plain fields but `command`, read in one call, and their defaults
_GET_REST = operator.attrgetter(*(k for k, _ in _PLAIN_DEFAULTS if k != "command"))
_DEFAULT_REST = tuple(v for k, v in _PLAIN_DEFAULTS if k != "command")


class _Unfrozen:
    """JobSpec's slots, settable: what _new_spec fills before it becomes a JobSpec."""

    __slots__ = JobSpec.__slots__


def _compile_new_spec() -> Callable[..., JobSpec]:
    """A function taking JobSpec's fields as its constructor does, only faster.

    A frozen dataclass's __init__ sets each of JobSpec's 22 fields through object.__setattr__,
    which costs more than all the rest of reading a job-file row (or a stored job, for a
    worker). This function fills an unfrozen object of the same layout instead, then makes it
    a JobSpec (assigning __class__, which Python allows between classes with the same slots).
    It is generated from the fields, as dataclasses generates __init__, and checked: when it
    would not give the JobSpec the constructor gives (another Python, say), the constructor
    is used.
    """
    names = [f.name for f in fields(JobSpec)]
    factories = {f.name for f in fields(JobSpec) if f.default_factory is not MISSING}
    params = ["command"] + [f"{n}=_NONE" if n in factories else f"{n}=_default_{n}"
                            for n in names if n != "command"]
    lines = [f"def make({', '.join(params)}):", "    o = _Unfrozen()"]
    lines += [f"    o.{n} = _factory_{n}() if {n} is _NONE else {n}" if n in factories
              else f"    o.{n} = {n}" for n in names]
    lines += ["    o.__class__ = JobSpec", "    return o"]
    namespace: dict[str, Any] = {"_Unfrozen": _Unfrozen, "JobSpec": JobSpec, "_NONE": object()}
    for f in fields(JobSpec):
        if f.name in factories:
            namespace[f"_factory_{f.name}"] = f.default_factory
        elif f.name != "command":
            namespace[f"_default_{f.name}"] = f.default
    sample = {"command": "x", "params": {"k": "v"}, "cpus": 2.0, "outputs": ("a",)}
    try:
        exec("\n".join(lines), namespace)
        made = namespace["make"](**sample)
        if type(made) is JobSpec and made == JobSpec(**sample):  # type: ignore[arg-type]
            return namespace["make"]  # type: ignore[no-any-return]
    except (TypeError, AttributeError):  # __class__ cannot be assigned here
        pass
    return JobSpec


_new_spec = _compile_new_spec()


def _encode_texts(m: Mapping[str, str]) -> str:
    """_ENCODE(dict(m)), three times faster for the usual mapping of text to text."""
    try:
        return "{" + ",".join([_ENCODE_STR(k) + ":" + _ENCODE_STR(v) for k, v in m.items()]) + "}"
    except TypeError:  # a key or value that is not text: let the encoder convert it
        return _ENCODE(dict(m))


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50,
}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off", ""}


def parse_size(value: object) -> int:
    """Bytes from `512MB`, `2GiB`, `1.5g` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a size")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; write e.g. 512MB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: object) -> float:
    """Seconds from `90`, `90s`, `5m`, `2h`, `1d` or `250ms`."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration; write e.g. 90, 90s, 5m or 2h")
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _DURATION_UNITS[unit]


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not true or false; write true/false, yes/no or 1/0")


def _number(value: object, kind: type[int] | type[float], low: float) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    try:
        n = kind(str(value).strip()) if isinstance(value, str) else kind(value)  # type: ignore[arg-type,call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a {'whole ' if kind is int else ''}number") from None
    if not math.isfinite(n) or n < low:
        raise ValueError(f"{value!r} must be at least {low:g}")
    return n


def _list(value: object, sep: str = ";") -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [p.strip() for p in str(value).split(sep) if p.strip()]


def _optional_duration(value: object, never: tuple[str, ...]) -> float | None:
    if str(value).strip().lower() in never:
        return None
    return parse_duration(value) or None


def _one_of(value: object, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return text


def _optional_text(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


_FIELD_PARSERS: dict[str, Any] = {
    "name": _optional_text,
    "cpus": lambda v: _number(v, float, 0),
    "memory": parse_size,
    "gpus": lambda v: _number(v, int, 0),
    "timeout": lambda v: None if str(v).strip() == "" else parse_duration(v),
    "max_attempts": lambda v: _number(v, int, 1),
    "workdir": _optional_text,
    "outputs": lambda v: tuple(_list(v)),
    "skip_if_done": parse_bool,
    "min_size": parse_size,
    "instance_type": _optional_text,
    "retry_on": lambda v: tuple(_number(x, int, 0) for x in _list(v, sep=",")),
    "retry_delay": parse_duration,
    "network": parse_bool,
    "image": _optional_text,
    "sandbox": _optional_text,
    "secret_env": lambda v: tuple(_list(v)),
    "stall_after": lambda v: _optional_duration(v, never=("never", "0")),
    "on_stall": lambda v: _one_of(v, ON_STALL),
}

#: (field, raw text) -> parsed value; values are immutable, so sharing them is safe
_PARSED: dict[Any, Any] = {}
#: the largest value the stores can hold, for whole-number fields
_MAX = {"memory": 2**63 - 1, "min_size": 2**63 - 1, "gpus": 2**31 - 1, "max_attempts": 2**31 - 1}
_TEXT_FIELDS = ("name", "workdir", "instance_type", "image", "sandbox")


def _check_text(value: str, *, source: str | None, line: int | None, column: str) -> None:
    """Refuse text no command line, path or environment can hold as written."""
    if "\0" in value:
        raise SpecError("the value holds a NUL character, which a command, path or environment"
                        " variable cannot hold", source=source, line=line, column=column,
                        hint="remove it (a NUL byte often means a binary or UTF-16 file)")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SpecError("the value is not valid Unicode text (it holds a lone surrogate)",
                        source=source, line=line, column=column,
                        hint="write the character itself, or a valid \\u escape pair") from None


def make_job(
    command: str,
    fields: Mapping[str, object],
    env: Mapping[str, object],
    params: Mapping[str, str],
    *,
    source: str | None = None,
    line: int | None = None,
) -> JobSpec:
    """Build a JobSpec from already-templated `command` and raw reserved `fields`.

    Empty values (``""`` or ``None``) leave a field at its default, so a CSV cell may be blank.
    Raises SpecError naming `source`, `line` and the column for every bad value.
    """
    if not command or not command.strip():
        raise SpecError("the job has no command", source=source, line=line, column="command",
                        hint="give every job a shell command line in the 'command' column/key")
    kwargs: dict[str, Any] = {}
    for key, raw in fields.items():
        parse = _FIELD_PARSERS.get(key)
        if parse is None:
            raise SpecError(f"'{key}' is not a job field", source=source, line=line,
                            hint=f"job fields are: {', '.join(sorted(RESERVED))}")
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            continue
        if isinstance(raw, str):  # table columns repeat values: parse each text once
            value = _PARSED.get((key, raw), _PARSED)
            if value is not _PARSED:
                kwargs[key] = value
                continue
        try:
            kwargs[key] = value = parse(raw)
        except ValueError as e:
            raise SpecError(str(e), source=source, line=line, column=key) from None
        if isinstance(raw, str):
            if len(_PARSED) >= 8192:
                _PARSED.clear()
            _PARSED[key, raw] = value
    if not kwargs and not env:  # the usual row: a command and its parameters
        if "\0" in command or not command.isascii():  # (ASCII without NUL is fine)
            _check_text(command, source=source, line=line, column="command")
        return _new_spec(command, env={}, params=dict(params))
    clean_env: dict[str, str] = {}
    secret = list(kwargs.get("secret_env", ()))
    for k, v in env.items():
        if not _ENV_NAME.match(k):
            raise SpecError(f"'{k}' is not a valid environment variable name", source=source,
                            line=line, column=ENV_PREFIX + k,
                            hint="use letters, digits and _, not starting with a digit")
        text = "" if v is None else str(v)
        if text.startswith(SECRET_PREFIX):
            text = read_secret(text, source=source, line=line, column=ENV_PREFIX + k)
            if k not in secret:
                secret.append(k)
        clean_env[k] = text
    for k in secret:
        if k not in clean_env:
            raise SpecError(f"secret_env names {k}, which is not in the job's env",
                            source=source, line=line, column="secret_env",
                            hint=f"give its value in an env.{k} column/key")
    if secret:
        kwargs["secret_env"] = tuple(secret)
    for key, most in _MAX.items():
        if kwargs.get(key, 0) > most:
            raise SpecError(f"{fields[key]!r} is too large (at most {most})", source=source,
                            line=line, column=key)
    _check_text(command, source=source, line=line, column="command")
    for key in _TEXT_FIELDS:
        if kwargs.get(key):
            _check_text(kwargs[key], source=source, line=line, column=key)
    for pattern in kwargs.get("outputs", ()):
        _check_text(pattern, source=source, line=line, column="outputs")
    for k, v in clean_env.items():
        _check_text(v, source=source, line=line, column=ENV_PREFIX + k)
    if kwargs.get("min_size") and not kwargs.get("outputs"):
        raise SpecError("min_size needs outputs to check", source=source, line=line,
                        column="min_size",
                        hint="declare the files in 'outputs' (globs, ;-separated)")
    return JobSpec(command=command, env=clean_env, params=dict(params), **kwargs)


def read_secret(text: str, *, source: str | None = None, line: int | None = None,
                column: str | None = None) -> str:
    """The value a `secret:` source names, read here, on the submitting side.

    `secret:NAME` and `secret:env:NAME` read this process's environment variable NAME;
    `secret:file:PATH` reads a file (one trailing newline dropped).
    """
    import os

    ref = text[len(SECRET_PREFIX):]
    if ref.startswith("file:"):
        path = os.path.expanduser(ref[len("file:"):])
        try:
            with open(path) as f:
                value = f.read()
        except OSError as e:
            raise SpecError(f"could not read the secret file {path}: {e.strerror}",
                            source=source, line=line, column=column,
                            hint="secret:file:PATH reads PATH where you submit") from None
        return value[:-1] if value.endswith("\n") else value
    name = ref[len("env:"):] if ref.startswith("env:") else ref
    if name not in os.environ:
        raise SpecError(f"the secret's variable {name} is not set in this environment",
                        source=source, line=line, column=column,
                        hint=f"export {name}=... before submitting, or use secret:file:PATH")
    return os.environ[name]
