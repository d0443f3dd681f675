"""The provider interface: what starts, lists and stops the machines (or processes, or batch
jobs) that run jobfleet workers.

A provider owns exactly what it created: every resource carries its fleet's name (a tag, a
job name, a file under a known folder), so `list()` finds those and nothing else, and
`fleet down` can prove that nothing of the fleet is left.

Workers find their store through their environment (`LaunchSpec.env`), never their command
line, where `ps` on the host would show a password.
"""

from __future__ import annotations

import abc
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from jobfleet.errors import ConfigError

#: a machine's life: launching (asked for), bootstrapping (setting up jobfleet), ready (its
#: worker runs), failed (see `reason`), stopped (gone, or its worker exited)
LAUNCHING, BOOTSTRAPPING, READY, FAILED, STOPPED = (
    "launching", "bootstrapping", "ready", "failed", "stopped")
PHASES = (LAUNCHING, BOOTSTRAPPING, READY, FAILED, STOPPED)
#: phases in which a machine is (or is about to be) a worker
LIVE = frozenset({LAUNCHING, BOOTSTRAPPING, READY})
#: variables a worker in gateway mode must not get: it holds a worker token instead
CREDENTIAL_VARIABLES = frozenset({
    "JOBFLEET_STORE", "JOBFLEET_BLOBS", "JOBFLEET_DASHBOARD_TOKEN", "PGPASSWORD", "PGPASSFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
#: fleet names become parts of host file names and batch job names
_FLEET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}\Z")


def check_fleet_name(name: str) -> str:
    if not _FLEET_NAME.match(name):
        raise ConfigError(f"fleet name {name!r} is not valid",
                          hint="use up to 40 lower-case letters, digits, '-' or '_'")
    return name


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What every worker of a launch is: where it takes jobs from and what it offers."""

    fleet: str
    run_id: str | None  # serve only this run; None: any run
    slots: int = 1
    cpus: float | None = None  # what each worker offers (and a batch system reserves)
    memory: int | None = None  # bytes
    gpus: int = 0
    idle_exit: float = 60.0  # a worker exits after this long without work, seconds
    lease_seconds: float | None = None
    #: the worker's environment: JOBFLEET_STORE, JOBFLEET_BLOBS and any credentials they need
    env: Mapping[str, str] = field(default_factory=dict)
    version: str = ""  # the jobfleet version workers must run (installed where absent)
    #: gateway mode: the `jobfleet server` workers take jobs from and the worker token they
    #: show it; they then get no store or blob credentials (see `worker_env`)
    server: str | None = None
    token: str | None = None
    ca_file: str | None = None  # the CA (PEM) that workers trust for the server, where they run

    def worker_env(self) -> dict[str, str]:
        """The environment workers get: `env`; in gateway mode without the store's and blob
        store's credentials, with the server, token and CA instead."""
        if not self.server:
            return dict(self.env)
        env = {k: v for k, v in self.env.items() if k not in CREDENTIAL_VARIABLES}
        env.update(JOBFLEET_SERVER=self.server, JOBFLEET_TOKEN=self.token or "")
        if self.ca_file:
            env["JOBFLEET_CA_FILE"] = self.ca_file
        return env

    def worker_args(self, worker_id: str) -> list[str]:
        """The arguments after `jobfleet worker` (no secrets: those travel in `env`)."""
        args = ["--id", worker_id, "--slots", str(self.slots), "--idle-exit", f"{self.idle_exit:g}"]
        if self.run_id:
            args += ["--run", self.run_id]
        if self.cpus is not None:
            args += ["--cpus", f"{self.cpus:g}"]
        if self.memory:
            args += ["--memory", str(self.memory)]
        if self.gpus:
            args += ["--gpus", str(self.gpus)]
        if self.lease_seconds is not None:
            args += ["--lease-seconds", f"{self.lease_seconds:g}"]
        return args

    def exports(self) -> str:
        """Shell lines that export `worker_env()`, for a script fed to a shell on its standard
        input."""
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(self.worker_env().items()))


@dataclass(frozen=True, slots=True)
class Machine:
    """One worker's place, as its provider sees it."""

    id: str  # the provider's name for it: a pid, host/pid, a Slurm job id
    provider: str
    fleet: str
    phase: str
    worker_id: str | None = None  # the jobfleet worker it runs (or will)
    host: str | None = None
    run_id: str | None = None
    reason: str | None = None  # why it failed, or stopped
    log_tail: tuple[str, ...] = ()  # the last lines of its setup or worker log
    attempts: int = 1  # setup attempts made


#: a provider calls this whenever one of its machines changes phase
OnChange = Callable[[Machine], None]


class Provider(abc.ABC):
    """Starts, lists and stops the workers of one fleet."""

    #: the name users choose it by (`--provider NAME`, `[fleet] provider = "NAME"`)
    name: ClassVar[str]

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        """`settings` are the provider's table of jobfleet.toml, with flags applied; a bad
        one raises ConfigError before anything starts."""
        self.fleet = check_fleet_name(fleet)
        self.on_change: OnChange = on_change or (lambda m: None)

    @abc.abstractmethod
    def launch(self, n: int, spec: LaunchSpec) -> list[Machine]:
        """Start `n` workers. Returns them at once (launching or bootstrapping); their later
        phases reach `on_change` (and `list`). A provider that cannot start one says so with
        a failed Machine, not an exception, so the others go on."""

    @abc.abstractmethod
    def list(self) -> list[Machine]:
        """Every machine of this fleet that exists, found afresh (not from memory)."""

    @abc.abstractmethod
    def terminate(self, ids: Sequence[str]) -> None:
        """Stop these machines: their workers drain (SIGTERM), then are killed."""

    @abc.abstractmethod
    def describe(self) -> dict[str, object]:
        """What this provider is and where it starts workers (no secrets), for status."""

    def capacity(self) -> int | None:
        """The most workers this provider can hold at once now (hosts left times workers per
        host, say); None: no limit of its own. The autoscaler wants no more."""
        return None

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """Let go of connections; machines keep running."""


def option(provider: str, settings: Mapping[str, object], name: str,
           kind: Callable[[object], object], default: object) -> object:
    """A provider setting, parsed; ConfigError naming it when it does not parse."""
    raw = settings.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"providers.{provider}: {name} = {raw!r}: {e}",
                          hint=f"fix {name} in [providers.{provider}] of jobfleet.toml"
                               " (or its flag)") from None
