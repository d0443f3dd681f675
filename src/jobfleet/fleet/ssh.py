"""The `ssh` provider: workers on the user's own hosts, reached over SSH (asyncssh).

A launch picks hosts round robin and returns at once; each worker is bootstrapped in the
background (Python checked, this jobfleet installed in a per-user virtualenv, the user's setup
script run, the worker started detached), its phases reported to `on_change`. On the host,
`~/.cache/jobfleet/fleets/FLEET/` holds each worker's state, pid, log and setup log, so any
process (`jobfleet fleet status`) lists the same workers in the same phases.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import concurrent.futures
import contextlib
import dataclasses
import getpass
import logging
import re
import secrets
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from jobfleet.errors import ConfigError
from jobfleet.fleet.base import (
    BOOTSTRAPPING,
    FAILED,
    LAUNCHING,
    LIVE,
    READY,
    STOPPED,
    LaunchSpec,
    Machine,
    OnChange,
    Provider,
    option,
)

if TYPE_CHECKING:
    from jobfleet.fleet.ssh_remote import Found, Remote

log = logging.getLogger("jobfleet.fleet.ssh")
T = TypeVar("T")
P = ParamSpec("P")

SETTINGS = ("hosts", "ssh_key", "known_hosts", "setup", "python", "workers_per_host",
            "bootstrap_attempts", "connect_timeout", "install")
#: how long a terminated worker has to drain before it is told again, then killed
TERMINATE_GRACE = 30.0
#: a failed bootstrap attempt waits this long times its number before the next
RETRY_PAUSE = 1.0
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*\Z")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"  # (_: ~/.ssh/config aliases have them)
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+\Z")
_WORKER_ID = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")


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


def _ssh_remote() -> Any:
    """The module that talks SSH (it imports asyncssh: only when the provider is used)."""
    try:
        from jobfleet.fleet import ssh_remote
    except ImportError as e:
        raise ConfigError(f"the ssh provider needs asyncssh ({e})",
                          hint="pip install 'jobfleet[ssh]'") from None
    return ssh_remote


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


class SshProvider(Provider):
    """Workers on SSH hosts, `workers_per_host` per host at most."""

    name = "ssh"

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        super().__init__(fleet, settings, on_change)
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

        self.hosts: tuple[Host, ...] = get("hosts", _hosts, ())
        key = get("ssh_key", _file("private key file"), None)
        self.workers_per_host: int = get("workers_per_host", _count, 1)
        self.bootstrap_attempts: int = get("bootstrap_attempts", _count, 2)
        _ssh_remote()  # asyncssh is there, or a ConfigError says which extra to install
        self.access = Access(
            key_file=key, known_hosts=get("known_hosts", _known_hosts, None),
            connect_timeout=get("connect_timeout", _seconds, 10.0),
            python=get("python", _python, "python3"), install=get("install", _install, "auto"),
            setup=get("setup", _file("setup script"), None))
        if key is not None:
            _check_key(key)
        self._lock = threading.Lock()
        self._machines: dict[str, Machine] = {}  # what this process launched, by id
        self._tasks: dict[str, asyncio.Task[None]] = {}  # bootstraps in progress
        self._given_up: set[str] = set()  # hosts whose bootstrap failed for good
        self._next = 0  # round robin
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._remotes: dict[str, Remote] = {}

    # -- the event loop thread ----------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._submit(coro).result(timeout)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(_LateExecutor(4, thread_name_prefix="jobfleet-ssh"))
                self._thread = threading.Thread(target=loop.run_forever, daemon=True,
                                                name=f"jobfleet-ssh-{self.fleet}")
                self._thread.start()
                self._loop = loop
                atexit.register(self.close)  # launched workers finish their bootstrap
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _remote(self, host: Host) -> Remote:
        if host.key not in self._remotes:
            self._remotes[host.key] = _ssh_remote().Remote(host, self.access, self.fleet)
        return self._remotes[host.key]

    # -- machines -----------------------------------------------------------------------------
    def _set(self, machine_id: str, notify: bool = True, **changes: Any) -> Machine:
        with self._lock:
            machine = dataclasses.replace(self._machines[machine_id], **changes)
            self._machines[machine_id] = machine
        if notify:
            try:
                self.on_change(machine)
            except Exception:  # a broken listener must not stop a bootstrap
                log.exception("on_change failed for %s", machine_id)
        return machine

    def _place(self) -> Host | None:
        """The next host with room, round robin; None when none has."""
        live: dict[str, int] = {}
        for m in self._machines.values():
            if m.phase in LIVE and m.host:
                live[m.host] = live.get(m.host, 0) + 1
        for i in range(len(self.hosts)):
            host = self.hosts[(self._next + i) % len(self.hosts)]
            if host.key not in self._given_up and live.get(host.entry, 0) < self.workers_per_host:
                self._next = (self._next + i + 1) % len(self.hosts)
                return host
        return None

    def launch(self, n: int, spec: LaunchSpec) -> list[Machine]:
        launched = []
        for _ in range(n):
            with self._lock:
                host = self._place()
                worker_id = f"{self.fleet}-{secrets.token_hex(4)}"
                if host is None:
                    launched.append(Machine(
                        id=f"{self.fleet}/{worker_id}", provider=self.name, fleet=self.fleet,
                        phase=FAILED, worker_id=worker_id, run_id=spec.run_id,
                        reason=self._no_room(), attempts=0))
                    continue
                machine = Machine(id=f"{host.key}/{worker_id}", provider=self.name,
                                  fleet=self.fleet, phase=LAUNCHING, worker_id=worker_id,
                                  host=host.entry, run_id=spec.run_id, attempts=0)
                self._machines[machine.id] = machine
            launched.append(machine)
            self._submit(self._start_bootstrap(machine.id, host, worker_id, spec))
        return launched

    def _no_room(self) -> str:
        if len(self._given_up) == len(self.hosts):
            return "no host left: every host failed its bootstrap (see jobfleet fleet status)"
        return (f"no host has room: {len(self.hosts)} host(s), at most {self.workers_per_host}"
                " worker(s) each (workers_per_host)")

    async def _start_bootstrap(self, machine_id: str, host: Host, worker_id: str,
                               spec: LaunchSpec) -> None:
        task = asyncio.get_running_loop().create_task(
            self._bootstrap(machine_id, host, worker_id, spec))
        self._tasks[machine_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(machine_id, None))

    async def _bootstrap(self, machine_id: str, host: Host, worker_id: str,
                         spec: LaunchSpec) -> None:
        remote = self._remote(host)
        bootstrap_error = _ssh_remote().BootstrapError
        reason = ""
        tail: tuple[str, ...] = ()
        state = {"host": host.entry, "run": spec.run_id or "", "fleet": self.fleet}
        for attempt in range(1, self.bootstrap_attempts + 1):
            self._set(machine_id, phase=BOOTSTRAPPING, attempts=attempt, reason=None, log_tail=())
            try:
                await remote.bootstrap(worker_id, spec, {**state, "attempts": attempt},
                                       f"bootstrap attempt {attempt} of {self.bootstrap_attempts}:"
                                       f" worker {worker_id}")
                self._set(machine_id, phase=READY, attempts=attempt)
                return
            except bootstrap_error as e:
                reason = e.reason
                tail = e.tail or await remote.setup_tail(worker_id)
                log.info("%s: bootstrap attempt %d failed: %s", machine_id, attempt, reason)
            except asyncio.CancelledError:  # terminated, or the provider closed
                with contextlib.suppress(bootstrap_error):
                    await remote.write_state(worker_id, {**state, "phase": STOPPED,
                                                         "attempts": attempt,
                                                         "reason": "bootstrap interrupted"})
                raise
            except Exception as e:  # a bug here must not leave the machine bootstrapping
                log.exception("%s: bootstrap attempt %d failed", machine_id, attempt)
                reason, tail = f"bootstrap error: {type(e).__name__}: {e}", ()
            if attempt < self.bootstrap_attempts:
                await asyncio.sleep(RETRY_PAUSE * attempt)
        why = f"{reason} (after {self.bootstrap_attempts} attempts; host left out)"
        log.warning("%s: %s", machine_id, why)
        with self._lock:
            self._given_up.add(host.key)
        with contextlib.suppress(bootstrap_error):
            await remote.write_state(worker_id, {**state, "phase": FAILED, "reason": why,
                                                 "attempts": self.bootstrap_attempts})
        self._set(machine_id, phase=FAILED, reason=why, log_tail=tuple(tail[-20:]))

    # -- list ---------------------------------------------------------------------------------
    def list(self) -> list[Machine]:
        return self._run(self._list())

    async def _list(self) -> builtins.list[Machine]:
        found = await asyncio.gather(*(self._list_host(h) for h in self.hosts))
        machines = [m for group in found for m in group]
        seen = {m.id for m in machines}
        with self._lock:  # launched here, not on the host yet (still connecting)
            pending = [m for m in self._machines.values() if m.phase in LIVE and m.id not in seen]
        return machines + pending

    async def _list_host(self, host: Host) -> builtins.list[Machine]:
        remote = self._remote(host)
        try:
            found = await remote.list()
        except _ssh_remote().BootstrapError as e:
            return [Machine(id=host.key, provider=self.name, fleet=self.fleet, phase=FAILED,
                            host=host.entry, reason=e.reason if e.reason.startswith("unreachable")
                            else f"unreachable: {e.reason}", attempts=0)]
        machines = []
        for f in found:
            if f.state.get("host", host.entry) != host.entry:
                continue  # another host's worker, in a home folder they share (NFS)
            machine = self._machine(host, f)
            if machine.phase == STOPPED and f.old:
                continue  # stopped over an hour ago: history, not the fleet
            with self._lock:
                known = self._machines.get(machine.id)
                if known is not None and machine.id in self._tasks:
                    machine, changed = known, False  # bootstrapping here: this process knows best
                else:
                    changed = known is not None and known.phase != machine.phase
                    if changed:
                        self._machines[machine.id] = machine
            if changed:
                self.on_change(machine)
            machines.append(machine)
        return machines

    def _machine(self, host: Host, f: Found) -> Machine:
        state = f.state.get("phase", "")
        reason = f.state.get("reason") or None
        tail = f.setup_tail
        if f.alive:
            phase, reason, tail = READY, None, f.log_tail
        elif state == FAILED:
            phase = FAILED
        elif f.pid is not None:
            phase, reason, tail = STOPPED, "the worker exited", f.log_tail
        elif state == STOPPED:
            phase, tail = STOPPED, f.log_tail or f.setup_tail
        elif state == READY:
            phase, reason, tail = STOPPED, "the worker is gone (no pid file)", f.log_tail
        elif f.stale:
            phase, reason = FAILED, ("bootstrap abandoned: no progress for 5 minutes (the"
                                     " process bootstrapping it is gone?)")
        else:
            phase = BOOTSTRAPPING
        attempts = int(f.state["attempts"]) if f.state.get("attempts", "").isdigit() else 1
        return Machine(id=f"{host.key}/{f.worker_id}", provider=self.name, fleet=self.fleet,
                       phase=phase, worker_id=f.worker_id, host=host.entry,
                       run_id=f.state.get("run") or None, reason=reason, log_tail=tail,
                       attempts=attempts)

    # -- terminate ----------------------------------------------------------------------------
    def terminate(self, ids: Sequence[str]) -> None:
        self._run(self._terminate(list(ids)))

    async def _terminate(self, ids: builtins.list[str]) -> None:
        by_host: dict[str, builtins.list[str]] = {}
        hosts = {h.key: h for h in self.hosts}
        for machine_id in ids:
            key, _, worker_id = machine_id.rpartition("/")
            if key not in hosts or not _WORKER_ID.match(worker_id):
                if key:  # (a host's own entry, "unreachable", has nothing to stop)
                    log.warning("terminate: %s is not a worker on this fleet's hosts",
                                machine_id)
                continue
            by_host.setdefault(key, []).append(worker_id)
        bootstraps = [t for i, t in self._tasks.items() if i in ids]
        for task in bootstraps:
            task.cancel()
        await asyncio.gather(*bootstraps, return_exceptions=True)
        results = await asyncio.gather(
            *(self._remote(hosts[k]).terminate(w, TERMINATE_GRACE) for k, w in by_host.items()),
            return_exceptions=True)
        for key, result in zip(by_host, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("terminate on %s failed: %s", hosts[key].entry, result)
        for machine_id in ids:
            known = self._machines.get(machine_id)
            if known is not None and known.phase != FAILED and known.phase != STOPPED:
                self._set(machine_id, phase=STOPPED, reason="terminated")

    # -- describe, close ----------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        return {
            "provider": self.name,
            "hosts": [h.entry for h in self.hosts],
            "ssh_key": self.access.key_file or "ssh agent / default keys",
            "known_hosts": self.access.known_hosts or "~/.ssh/known_hosts",
            "install": self.access.install,
            "python": self.access.python,
            "setup": self.access.setup,
            "workers_per_host": self.workers_per_host,
            "bootstrap_attempts": self.bootstrap_attempts,
        }

    def close(self) -> None:
        """Let go of the connections once the bootstraps under way are done (so the workers
        launched do start, even when this process is about to exit); Ctrl-C while waiting
        interrupts them. Also run at exit, for a process that launches and leaves."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        atexit.unregister(self.close)

        async def shut(cancel: bool) -> None:
            tasks = list(self._tasks.values())
            for task in tasks if cancel else ():
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            await asyncio.gather(*(r.close() for r in self._remotes.values()),
                                 return_exceptions=True)
            self._remotes.clear()

        try:
            asyncio.run_coroutine_threadsafe(shut(cancel=False), loop).result()
        except KeyboardInterrupt:
            asyncio.run_coroutine_threadsafe(shut(cancel=True), loop).result(30)
            raise
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()


class _LateExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's thread pool (asyncssh reads keys and resolves names in it). While the
    interpreter shuts down, as a process that launched workers waits at exit for their
    bootstraps, thread pools take nothing new: then it runs what it is given at once."""

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits on it)
                future.set_exception(e)
            return future


def _check_key(path: str) -> None:
    """A key file asyncssh can use (not encrypted: use the agent for those)."""
    import asyncssh

    try:
        asyncssh.read_private_key(path)
    except asyncssh.KeyImportError as e:
        hint = ("load it into ssh-agent and leave ssh_key out" if "passphrase" in str(e).lower()
                else "point ssh_key at a private key (e.g. ~/.ssh/id_ed25519, not the .pub)")
        raise ConfigError(f"providers.ssh: ssh_key = {path!r}: {e}", hint=hint) from None

