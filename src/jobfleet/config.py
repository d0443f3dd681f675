"""Settings: defaults, then `jobfleet.toml`, then `JOBFLEET_*` variables, then flags.

Every value remembers where it came from, so errors (and later `jobfleet validate`) can say
"JOBFLEET_LEASE_SECONDS=abc" or "jobfleet.toml: lease_seconds" instead of just "bad value".
A plain dataclass rather than pydantic: every CLI command and every worker loads settings,
and pydantic's import alone would double their start-up time.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from jobfleet.errors import ConfigError
from jobfleet.spec.model import parse_duration

CONFIG_FILE = "jobfleet.toml"
#: tables of jobfleet.toml that jobfleet.fleet reads: [fleet], [providers.NAME], [prices]
FLEET_TABLES = ("fleet", "providers", "prices")
#: [fleet] settings that JOBFLEET_NAME variables set too
FLEET_VARIABLES = ("provider", "fleet", "max_workers", "keep_alive", "max_total_cost",
                   "max_hourly_cost")
#: variables of workers and clients that use a `jobfleet server` (see jobfleet.gateway)
GATEWAY_VARIABLES = ("server", "token_file", "token", "ca_file", "dashboard_token")
ENV_PREFIX = "JOBFLEET_"


def _positive_int(value: object) -> int:
    n = int(str(value).strip())
    if n < 1:
        raise ValueError(f"{value!r} must be at least 1")
    return n


def _text(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("it is empty")
    return text


@dataclass(slots=True)
class Settings:
    """Where the store and blobs are, and how workers behave."""

    store: str = ".jobfleet/jobfleet.db"
    blobs: str = ".jobfleet/blobs"
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    lease_seconds: float = 60.0
    kill_grace: float = 5.0
    drain_seconds: float = 30.0
    #: setting name -> where its value came from ("default", "jobfleet.toml", "env JOBFLEET_X", "flag")
    sources: dict[str, str] = field(default_factory=dict)
    #: setting name -> the line of jobfleet.toml that set it, when the file did
    lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SettingProblem:
    """One thing wrong with the settings: where it was written, what is wrong, how to fix it."""

    source: str  # a file, "env JOBFLEET_X" or "flag --x"
    message: str
    fix: str
    line: int | None = None
    setting: str | None = None
    #: a warning is worth reading but the setting still works (an unknown JOBFLEET_ variable)
    warning: bool = False

    @property
    def where(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"

    def error(self) -> ConfigError:
        return ConfigError(f"{self.where}: {self.message}", hint=self.fix)


_PARSERS: dict[str, Callable[[object], Any]] = {
    "store": _text,
    "blobs": _text,
    "slots": _positive_int,
    "lease_seconds": parse_duration,
    "kill_grace": parse_duration,
    "drain_seconds": parse_duration,
}
_PATHS = ("store", "blobs")
#: what a good value of each setting looks like, for the fix of a bad one
_EXPECTED = {
    "store": "a SQLite path or a postgresql:// URL",
    "blobs": "a folder or a URL such as s3://bucket/prefix",
    "slots": "a whole number, at least 1 (the default is the CPU count)",
    "lease_seconds": "a duration such as 60, 90s or 5m",
    "kill_grace": "a duration such as 5 or 10s",
    "drain_seconds": "a duration such as 30s or 2m",
}


def _is_local_path(value: str) -> bool:
    return "://" not in value and not value.startswith("sqlite:")


def _key_line(text: str, key: str) -> int | None:
    """The line of a TOML file on which `key = ...` (or the table `[key]`) is written."""
    k = re.escape(key)
    pattern = re.compile(rf"""\s*(\[(jobfleet\.)?{k}\]|["']?{k}["']?\s*=)""")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return n
    return None


def load_settings(
    flags: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    problems: list[SettingProblem] | None = None,
) -> Settings:
    """Settings for this command. `flags` holds only the options the user actually gave.

    A bad value raises ConfigError; given a `problems` list instead, every problem is added to
    it (with warnings such as a misspelt JOBFLEET_ variable) and a bad value keeps the one
    before it, so `jobfleet validate` can report them all at once.
    """
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    s = Settings()
    s.sources = {f.name: "default" for f in fields(Settings) if f.name in _PARSERS}
    s.store, s.blobs = str(cwd / s.store), str(cwd / s.blobs)

    def report(problem: SettingProblem) -> None:
        if problems is None:
            raise problem.error()
        problems.append(problem)

    def put(name: str, raw: object, source: str, base: Path, line: int | None = None) -> None:
        try:
            value = _PARSERS[name](raw)
        except ValueError as e:
            report(SettingProblem(source, f"{name} = {raw!r}: {e}",
                                  f"set {name} there to {_EXPECTED[name]}", line, name))
            return
        if name in _PATHS and problems is not None and (bad := _check_location(name, value)):
            report(SettingProblem(source, *bad, line, name))
        if name in _PATHS and _is_local_path(value) and not os.path.isabs(value):
            value = str(base / os.path.expanduser(value))
        setattr(s, name, value)
        s.sources[name] = source
        if line is not None:
            s.lines[name] = line

    path = config_path(env, cwd)
    if path.is_file():
        try:
            text = path.read_text()
            data = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            report(SettingProblem(str(path), f"not valid TOML: {e}", "fix the file's syntax"))
            data, text = {}, ""
        table = data.get("jobfleet", data)
        for key, raw in table.items():
            line = _key_line(text, key) if problems is not None else None
            if key not in _PARSERS:
                if key in FLEET_TABLES and isinstance(raw, dict):  # read by jobfleet.fleet
                    continue
                if isinstance(raw, dict):
                    if problems is not None:
                        problems.append(SettingProblem(
                            str(path), f"the table [{key}] is not read by jobfleet",
                            f"tables are: {', '.join(f'[{t}]' for t in FLEET_TABLES)}", line, key,
                            warning=True))
                    continue
                report(SettingProblem(str(path), f"unknown setting '{key}'",
                                      f"settings are: {', '.join(_PARSERS)}", line, key))
                continue
            put(key, raw, str(path), path.parent, line)
    for name in _PARSERS:
        var = ENV_PREFIX + name.upper()
        if env.get(var):
            put(name, env[var], f"env {var}", cwd)
    for name, raw in (flags or {}).items():
        if raw is not None:
            put(name, raw, f"flag --{name.replace('_', '-')}", cwd)
    if problems is not None:
        problems.extend(_check_values(s))
        problems.extend(_unknown_variables(env))
    return s


def config_path(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The settings file: $JOBFLEET_CONFIG, else jobfleet.toml in the current folder."""
    env = os.environ if env is None else env
    return Path(env.get(ENV_PREFIX + "CONFIG") or (cwd or Path.cwd()) / CONFIG_FILE)


def _unknown_variables(env: Mapping[str, str]) -> list[SettingProblem]:
    """Warnings for JOBFLEET_ variables that look like a misspelt setting (other JOBFLEET_
    variables, such as those a job sees, are not settings and are left alone)."""
    known = [ENV_PREFIX + name.upper() for name in _PARSERS] + [ENV_PREFIX + "CONFIG"]
    known += [ENV_PREFIX + name.upper() for name in FLEET_VARIABLES + GATEWAY_VARIABLES]
    found = []
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var not in known:
            close = difflib.get_close_matches(var, known, n=1, cutoff=0.8)
            if close:
                found.append(SettingProblem(f"env {var}", "not a setting, so it is ignored",
                                            f"did you mean {close[0]}?", warning=True))
    return found


#: URL schemes each store can be opened with (a bare path is a SQLite file or a folder)
STORE_SCHEMES = ("sqlite", "file", "postgresql", "postgres", "https", "http")
BLOB_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
#: `user@host`, `host:5432` or `host:5432/db` written without a scheme
_SCHEMELESS = re.compile(r"[^/\s]*@[^/\s]+|[A-Za-z0-9.-]+:\d+(/.*)?\Z")


def _check_location(name: str, value: str) -> tuple[str, str] | None:
    """(what is wrong, fix) for a store or blobs location as written: a URL without its
    scheme, or with one that no store opens; None when it looks right."""
    schemes, example = ((STORE_SCHEMES, "postgresql://user@host:5432/db") if name == "store"
                        else (BLOB_SCHEMES, "s3://bucket/prefix"))
    scheme, sep, _ = value.partition("://")
    if sep and scheme.lower() not in schemes:
        return (f"{name} = {value!r}: unknown URL scheme '{scheme}'",
                f"use a path or one of {', '.join(s + '://' for s in schemes)}")
    if not sep and _SCHEMELESS.match(value):
        return (f"{name} = {value!r} looks like a URL without its scheme",
                f"write the whole URL, e.g. {example}, or a path such as ./{value}")
    return None


def _check_values(s: Settings) -> list[SettingProblem]:
    """What loads but cannot work together: a lease too short to renew, a kill grace longer
    than the lease."""
    found: list[SettingProblem] = []

    def add(name: str, message: str, fix: str) -> None:
        found.append(SettingProblem(s.sources.get(name, "default"), message, fix,
                                    s.lines.get(name), name))

    if s.lease_seconds < 1:
        add("lease_seconds", f"lease_seconds = {s.lease_seconds:g}: a lease shorter than 1 s"
            " expires before a worker can renew it", "use at least 5s (the default is 60s)")
    elif s.lease_seconds <= s.kill_grace:
        add("kill_grace", f"kill_grace = {s.kill_grace:g} s is not shorter than the lease"
            f" ({s.lease_seconds:g} s): a job being stopped would lose its lease first",
            "make kill_grace shorter than lease_seconds")
    return found
