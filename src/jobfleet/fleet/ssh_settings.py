"""The ssh provider's settings (`[providers.ssh]` of jobfleet.toml, or flags): parsed and
checked before anything starts, each mistake a ConfigError that names the setting."""

from __future__ import annotations

import getpass
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobfleet.errors import ConfigError
from jobfleet.fleet.base import option

SETTINGS = ("hosts", "ssh_key", "known_hosts", "setup", "python", "workers_per_host",
            "bootstrap_attempts", "connect_timeout", "install")
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*\Z")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"  # (_: ~/.ssh/config aliases have them)
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+\Z")


@dataclass(frozen=True, slots=True)
class Host:
    """A `user@host:port` entry of the `hosts` setting."""

    user: str
    address: str
    port: int

    @property
    def key(self) -> str:
        """`host:port`, as machine ids start (an IPv6 address in brackets)."""
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{address}:{self.port}"

    @property
    def entry(self) -> str:
        return f"{self.user}@{self.key}"


@dataclass(frozen=True, slots=True)
class Access:
    """How to reach and prepare every host: the settings they share."""

    key_file: str | None  # None: the agent and default keys
    known_hosts: str | None  # None: ~/.ssh/known_hosts; "ignore": no host key check
    connect_timeout: float
    python: str
    install: str  # "auto" or "never"
    setup: str | None  # a local script


def parse_host(entry: str) -> Host:
    """`user@host[:port]` (user: this user; port: 22; an IPv6 address in brackets)."""
    text = entry.strip()
    user, at, rest = text.rpartition("@")
    if not at:
        user, rest = getpass.getuser(), text
    if not _USER.match(user):
        raise ValueError(f"the user {user!r} is not a user name")
    port_text = ""
    if rest.startswith("["):
        address, bracket, tail = rest[1:].partition("]")
        if not bracket or not _IPV6.match(address) or (tail and not tail.startswith(":")):
            raise ValueError("write an IPv6 address as user@[addr] or user@[addr]:port")
        port_text = tail[1:] if tail else ""
        has_port = bool(tail)
    else:
        address, colon, port_text = rest.partition(":")
        has_port = bool(colon)
    if not address or not (_HOSTNAME.match(address) or rest.startswith("[")):
        raise ValueError(f"{address!r} is not a host name or address;"
                         " write user@host or user@host:port")
    port = 22
    if has_port:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"the port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    return Host(user, address, port)


def _hosts(raw: object) -> tuple[Host, ...]:
    entries = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(entries, list | tuple) or not all(isinstance(e, str) for e in entries):
        raise ValueError("write a list of user@host[:port] entries, or one string of them"
                         " separated by commas")
    entries = [e for e in entries if e.strip()]
    hosts = []
    for entry in entries:
        try:
            hosts.append(parse_host(entry))
        except ValueError as e:
            raise ValueError(f"{entry.strip()!r}: {e}" if len(entries) > 1 else str(e)) from None
    if not hosts:
        raise ValueError("no host given")
    seen: set[str] = set()
    for h in hosts:
        if h.entry in seen:
            raise ValueError(f"{h.entry} is listed twice (use workers_per_host for more workers)")
        seen.add(h.entry)
    return tuple(hosts)


def _file(what: str) -> Any:
    def parse(raw: object) -> str:
        path = Path(str(raw)).expanduser()
        if not path.is_file():
            raise ValueError(f"no {what} at {path}")
        try:
            path.open("rb").close()
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        return str(path.resolve())
    return parse


def _known_hosts(raw: object) -> str:
    if str(raw).strip() == "ignore":
        return "ignore"
    return str(_file("known_hosts file")(raw))


def _count(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError("not a number")
    n = int(str(raw).strip())
    if n < 1:
        raise ValueError("it must be at least 1")
    return n


def _seconds(raw: object) -> float:
    from jobfleet.spec.model import parse_duration

    value = parse_duration(raw)
    if value <= 0:
        raise ValueError("it must be more than 0")
    return value


def _install(raw: object) -> str:
    value = str(raw).strip().lower()
    if value not in ("auto", "never"):
        raise ValueError("write auto (install jobfleet on hosts that lack it) or never")
    return value


def _python(raw: object) -> str:
    value = str(raw).strip()
    if not value or "\n" in value:
        raise ValueError("write an interpreter's name or path, e.g. python3.11")
    return value


@dataclass(frozen=True, slots=True)
class SshSettings:
    hosts: tuple[Host, ...]
    access: Access
    workers_per_host: int
    bootstrap_attempts: int


def ssh_settings(settings: Mapping[str, object]) -> SshSettings:
    """The settings, checked (ConfigError naming the first bad one)."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"providers.ssh: no setting {', '.join(map(repr, unknown))}",
                          hint=f"[providers.ssh] settings are: {', '.join(SETTINGS)}")
    if settings.get("hosts") in (None, "", [], ()):
        raise ConfigError("providers.ssh: hosts is not set",
                          hint="list the hosts as hosts = [\"user@host:port\", ...] in"
                               " [providers.ssh] of jobfleet.toml, or --hosts")

    def get(name: str, kind: Any, default: object) -> Any:
        return option("ssh", settings, name, kind, default)

    hosts = get("hosts", _hosts, ())
    key = get("ssh_key", _file("private key file"), None)
    workers_per_host = get("workers_per_host", _count, 1)
    bootstrap_attempts = get("bootstrap_attempts", _count, 2)
    access = Access(
        key_file=key, known_hosts=get("known_hosts", _known_hosts, None),
        connect_timeout=get("connect_timeout", _seconds, 10.0),
        python=get("python", _python, "python3"), install=get("install", _install, "auto"),
        setup=get("setup", _file("setup script"), None))
    if key is not None:
        _check_key(key)
    return SshSettings(hosts, access, workers_per_host, bootstrap_attempts)


def _check_key(path: str) -> None:
    """A key file asyncssh can use (not encrypted: use the agent for those)."""
    import asyncssh

    try:
        asyncssh.read_private_key(path)
    except asyncssh.KeyImportError as e:
        hint = ("load it into ssh-agent and leave ssh_key out" if "passphrase" in str(e).lower()
                else "point ssh_key at a private key (e.g. ~/.ssh/id_ed25519, not the .pub)")
        raise ConfigError(f"providers.ssh: ssh_key = {path!r}: {e}", hint=hint) from None

