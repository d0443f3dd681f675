"""Settings: defaults, then `jobfleet.toml`, then `JOBFLEET_*` variables, then flags.

Every value remembers where it came from, so errors (and later `jobfleet validate`) can say
"JOBFLEET_LEASE_SECONDS=abc" or "jobfleet.toml: lease_seconds" instead of just "bad value".
A plain dataclass rather than pydantic: every CLI command and every worker loads settings,
and pydantic's import alone would double their start-up time.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from jobfleet.errors import ConfigError
from jobfleet.spec.model import parse_duration

CONFIG_FILE = "jobfleet.toml"
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


_PARSERS: dict[str, Callable[[object], Any]] = {
    "store": _text,
    "blobs": _text,
    "slots": _positive_int,
    "lease_seconds": parse_duration,
    "kill_grace": parse_duration,
    "drain_seconds": parse_duration,
}
_PATHS = ("store", "blobs")


def _is_local_path(value: str) -> bool:
    return "://" not in value and not value.startswith("sqlite:")


def load_settings(
    flags: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Settings for this command. `flags` holds only the options the user actually gave."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    s = Settings()
    s.sources = {f.name: "default" for f in fields(Settings) if f.name != "sources"}
    s.store, s.blobs = str(cwd / s.store), str(cwd / s.blobs)

    def put(name: str, raw: object, source: str, base: Path) -> None:
        try:
            value = _PARSERS[name](raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {name} = {raw!r}: {e}",
                              hint=f"fix the value of {name} there") from None
        if name in _PATHS and _is_local_path(value) and not os.path.isabs(value):
            value = str(base / os.path.expanduser(value))
        setattr(s, name, value)
        s.sources[name] = source

    path = Path(env.get(ENV_PREFIX + "CONFIG") or cwd / CONFIG_FILE)
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}", hint="fix the file's syntax") from None
        table = data.get("jobfleet", data)
        for key, raw in table.items():
            if key not in _PARSERS:
                if isinstance(raw, dict):
                    continue  # a table for a later part (providers, ...)
                raise ConfigError(f"{path}: unknown setting '{key}'",
                                  hint=f"settings are: {', '.join(_PARSERS)}")
            put(key, raw, str(path), path.parent)
    for name in _PARSERS:
        var = ENV_PREFIX + name.upper()
        if env.get(var):
            put(name, env[var], f"env {var}", cwd)
    for name, raw in (flags or {}).items():
        if raw is not None:
            put(name, raw, f"flag --{name.replace('_', '-')}", cwd)
    return s
