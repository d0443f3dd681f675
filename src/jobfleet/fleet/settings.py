"""Fleet settings: `[fleet]` and `[providers.NAME]` of jobfleet.toml, `JOBFLEET_*` variables,
then flags; the provider's own settings are checked by the provider when it is made."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobfleet.config import ENV_PREFIX, config_path
from jobfleet.errors import ConfigError
from jobfleet.fleet.cost import check_ceiling
from jobfleet.spec.model import parse_bool, parse_duration


def _count(value: object) -> int:
    n = int(str(value).strip())
    if n < 1:
        raise ValueError("it must be at least 1")
    return n


def _dollars(value: object) -> float:
    n = float(str(value).strip().lstrip("$"))
    if not n >= 0:
        raise ValueError("it must be a number of US dollars, 0 or more")
    return n


_PARSERS: dict[str, Any] = {
    "provider": lambda v: str(v).strip(),
    "name": lambda v: str(v).strip(),
    "max_workers": _count,
    "workers_ceiling": _count,
    "slots": _count,
    "idle_exit": parse_duration,
    "keep_alive": parse_bool,
    "price": _dollars,
    "max_hourly_cost": _dollars,
    "max_total_cost": _dollars,
    "absolute_timeout": parse_duration,
    "server": lambda v: str(v).strip(),
    "worker_token_file": lambda v: str(v).strip(),
    "ca_file": lambda v: str(v).strip(),
}
#: the variable for each setting that has one
_VARIABLES = {"provider": "PROVIDER", "name": "FLEET", "max_workers": "MAX_WORKERS",
              "keep_alive": "KEEP_ALIVE", "max_total_cost": "MAX_TOTAL_COST",
              "max_hourly_cost": "MAX_HOURLY_COST"}


@dataclass(slots=True)
class FleetSettings:
    """Which provider starts workers, how many at most, and how each behaves."""

    provider: str = "local"
    name: str = "default"  # the fleet: every resource a provider makes carries it
    max_workers: int = 4
    slots: int | None = None  # jobs at once per worker; None: the `slots` setting
    idle_exit: float = 60.0  # a worker with nothing to do exits after this long, seconds
    keep_alive: bool = False  # no automatic teardown (debugging)
    #: max_workers may not go above this unless it is raised on purpose
    workers_ceiling: int = 500
    price: float | None = None  # US dollars per worker-hour, over the price table
    max_hourly_cost: float | None = None  # caps, enforced: see fleet.cost
    max_total_cost: float | None = None
    absolute_timeout: float | None = None  # seconds a run may take, from its creation
    prices: dict[str, float] = field(default_factory=dict)  # [prices]: instance type -> $/h
    #: gateway mode: workers take jobs from this `jobfleet server` with the worker token in
    #: this file, trusting the CA in ca_file (a path where the workers run)
    server: str | None = None
    worker_token_file: str | None = None
    ca_file: str | None = None
    providers: dict[str, dict[str, object]] = field(default_factory=dict)  # their tables
    sources: dict[str, str] = field(default_factory=dict)

    def provider_settings(self) -> dict[str, object]:
        return dict(self.providers.get(self.provider, {}))


def load_fleet_settings(flags: Mapping[str, object] | None = None, *,
                        provider_flags: Mapping[str, object] | None = None,
                        env: Mapping[str, str] | None = None,
                        cwd: Path | None = None) -> FleetSettings:
    """The fleet's settings; `flags` are the [fleet] ones given on the command line and
    `provider_flags` those for the provider's table (`--hosts`, `--ssh-key`)."""
    env = os.environ if env is None else env
    s = FleetSettings()
    s.sources = dict.fromkeys(_PARSERS, "default")

    def put(name: str, raw: object, source: str) -> None:
        try:
            setattr(s, name, _PARSERS[name](raw))
        except ValueError as e:
            raise ConfigError(f"{source}: {name} = {raw!r}: {e}",
                              hint=f"fix {name} there") from None
        s.sources[name] = source

    path = config_path(env, cwd)
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}", hint="fix the file's syntax") from None
        table = data.get("jobfleet", data)
        for key, raw in _table(table, "fleet", path).items():
            if key not in _PARSERS:
                raise ConfigError(f"{path}: [fleet] has no setting '{key}'",
                                  hint=f"[fleet] settings are: {', '.join(_PARSERS)}")
            put(key, raw, f"{path} [fleet]")
        for name, settings in _table(table, "providers", path).items():
            if not isinstance(settings, dict):
                raise ConfigError(f"{path}: providers.{name} is not a table",
                                  hint=f"write its settings under [providers.{name}]")
            s.providers[name] = dict(settings)
        for itype, raw in _table(table, "prices", path).items():
            try:
                s.prices[itype] = _dollars(raw)
            except ValueError as e:
                raise ConfigError(f"{path}: [prices] {itype} = {raw!r}: {e}",
                                  hint="write the price of one instance-hour in US dollars"
                                  ) from None
    for name, var in _VARIABLES.items():
        if env.get(ENV_PREFIX + var):
            put(name, env[ENV_PREFIX + var], f"env {ENV_PREFIX + var}")
    for name, raw in (flags or {}).items():
        if raw is not None:
            put(name, raw, f"flag --{name.replace('_', '-')}")
    chosen = s.providers.setdefault(s.provider, {})
    chosen.update({k: v for k, v in (provider_flags or {}).items() if v is not None})
    check_ceiling(s.max_workers, s.workers_ceiling)
    if s.server and not s.worker_token_file:
        raise ConfigError(f"{s.sources['server']}: server is set but worker_token_file is not",
                          hint="create one with `jobfleet token create --role worker --out FILE`"
                               " and set [fleet] worker_token_file = FILE")
    return s


def _table(data: Mapping[str, Any], key: str, path: Path) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: '{key}' is not a table", hint=f"write [{key}] above its settings")
    return table
