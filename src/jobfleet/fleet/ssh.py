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
import logging
import re
import secrets
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
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
)
from jobfleet.fleet.ssh_settings import Host, ssh_settings

if TYPE_CHECKING:
    from jobfleet.fleet.ssh_remote import Found, Remote

log = logging.getLogger("jobfleet.fleet.ssh")
T = TypeVar("T")
P = ParamSpec("P")

#: how long a terminated worker has to drain before it is told again, then killed
TERMINATE_GRACE = 30.0
#: a failed bootstrap attempt waits this long times its number before the next
RETRY_PAUSE = 1.0
_WORKER_ID = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")


def _ssh_remote() -> Any:
    """The module that talks SSH (it imports asyncssh: only when the provider is used)."""
    try:
        from jobfleet.fleet import ssh_remote
    except ImportError as e:
        raise ConfigError(f"the ssh provider needs asyncssh ({e})",
                          hint="pip install 'jobfleet[ssh]'") from None
    return ssh_remote


class SshProvider(Provider):
    """Workers on SSH hosts, `workers_per_host` per host at most."""

    name = "ssh"

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        super().__init__(fleet, settings, on_change)
        _ssh_remote()  # asyncssh is there, or a ConfigError says which extra to install
        checked = ssh_settings(settings)
        self.hosts = checked.hosts
        self.access = checked.access
        self.workers_per_host = checked.workers_per_host
        self.bootstrap_attempts = checked.bootstrap_attempts
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
    def _set(self, machine_id: str, **changes: Any) -> Machine:
        """Change a machine this process launched, and say so."""
        with self._lock:
            machine = dataclasses.replace(self._machines[machine_id], **changes)
            self._machines[machine_id] = machine
        self._notify(machine)
        return machine

    def _notify(self, machine: Machine) -> None:
        try:
            self.on_change(machine)
        except Exception:  # a broken listener must not stop a bootstrap, or a list
            log.exception("on_change failed for %s", machine.id)

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

    def capacity(self) -> int | None:
        with self._lock:
            return (len(self.hosts) - len(self._given_up)) * self.workers_per_host

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
                self._notify(machine)
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
