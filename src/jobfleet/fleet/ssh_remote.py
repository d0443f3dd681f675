"""One SSH host as the ssh provider uses it: a connection (asyncssh, kept and reopened), and
the steps that bootstrap, list and stop the fleet's workers there.

Everything runs in the provider's event loop. A step that fails raises `BootstrapError` with
a reason fit for `fleet status`; the host's setup log has the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import posixpath
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from jobfleet.fleet import ssh_scripts as scripts
from jobfleet.fleet.base import LaunchSpec
from jobfleet.fleet.ssh_settings import Access, Host
from jobfleet.fleet.wheel import build_wheel

log = logging.getLogger("jobfleet.fleet.ssh")

MIN_PYTHON = (3, 11)
#: jobfleet's folder on a host, from its home folder
BASE = ".cache/jobfleet"
#: a step's time limit: short scripts, the install (pip may download), the user's setup
STEP_TIMEOUT, INSTALL_TIMEOUT, SETUP_TIMEOUT = 60.0, 1800.0, 1800.0
#: how long a started worker has to say it serves before it counts as ready anyway
READY_WAIT = 15
#: a bootstrap in progress touches its state file this often (seconds), so a lister can tell
#: a live bootstrap (touched within 5 minutes) from an abandoned one
TOUCH_EVERY = 60.0
#: bootstraps at once on one host: each holds an SSH session open, and sshd allows ten per
#: connection by default (MaxSessions), some of them for list, terminate and touch
BOOTSTRAPS_AT_ONCE = 6
TAIL = 20


class BootstrapError(Exception):
    """A bootstrap step failed: `reason` for status, `tail` of the setup log if known."""

    def __init__(self, reason: str, tail: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tail = tuple(tail)


@dataclass(frozen=True, slots=True)
class Found:
    """A worker's files on a host, as `list` read them."""

    worker_id: str
    state: Mapping[str, str]
    stale: bool  # its bootstrap has not touched the state file for 5 minutes
    old: bool  # nothing of it has changed for an hour
    pid: int | None
    alive: bool
    setup_tail: tuple[str, ...]
    log_tail: tuple[str, ...]


def connect_reason(host: Host, e: BaseException) -> str:
    """Why a connection failed, with what to do."""
    if isinstance(e, asyncssh.PermissionDenied):
        return (f"key refused: {host.entry} did not accept the key (check ssh_key, and that its"
                " public half is in the host's ~/.ssh/authorized_keys)")
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        where = "known_hosts" if host.port == 22 else f"known_hosts (-p {host.port})"
        return (f"host key of {host.key} not trusted: {e.reason}; add it to {where}"
                f" with ssh-keyscan, or check it is the right host")
    if isinstance(e, TimeoutError):
        return f"unreachable: {host.key} did not answer in time"
    text = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
    return f"unreachable: {host.key}: {text}"


class Remote:
    """One host: its connection, and the fleet's workers there. Paths are relative to the
    host's home folder (every script starts there)."""

    def __init__(self, host: Host, access: Access, fleet: str) -> None:
        self.host = host
        self.access = access
        self.fleet = fleet
        self.fleet_dir = f"{BASE}/fleets/{fleet}"
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connecting = asyncio.Lock()
        self._installing = asyncio.Lock()
        self._bootstraps = asyncio.Semaphore(BOOTSTRAPS_AT_ONCE)
        self._underway: set[str] = set()  # workers bootstrapping here now
        self._toucher: asyncio.Task[None] | None = None

    def file(self, worker_id: str, kind: str) -> str:
        return f"{self.fleet_dir}/{worker_id}.{kind}"

    # -- the connection -----------------------------------------------------------------------
    async def connection(self) -> asyncssh.SSHClientConnection:
        """The open connection, opened (again) when needed; BootstrapError if it cannot be."""
        async with self._connecting:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            options: dict[str, Any] = {
                "username": self.host.user, "port": self.host.port,
                "connect_timeout": self.access.connect_timeout,
                "login_timeout": max(self.access.connect_timeout, 30.0),
                "keepalive_interval": 30, "keepalive_count_max": 4,
            }
            if self.access.key_file:
                options["client_keys"] = [self.access.key_file]
            if self.access.known_hosts == "ignore":
                options["known_hosts"] = None
            elif self.access.known_hosts:
                options["known_hosts"] = self.access.known_hosts
            quiet_asyncssh()
            try:
                self._conn = await asyncssh.connect(self.host.address, **options)
            except (OSError, asyncssh.Error, TimeoutError) as e:
                raise BootstrapError(connect_reason(self.host, e)) from None
            return self._conn

    async def close(self) -> None:
        if self._toucher is not None:
            self._toucher.cancel()
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.wait_closed(), 5)
            self._conn = None

    async def run(self, command: str, stdin: str | None, timeout: float = STEP_TIMEOUT) -> _Done:
        """`command` through the user's shell, `stdin` fed to it."""
        conn = await self.connection()
        try:
            done = await conn.run(command, input=stdin, check=False, timeout=timeout)
        except asyncssh.TimeoutError:
            raise BootstrapError(f"no answer from {self.host.key} after {timeout:g} s") from None
        except (OSError, asyncssh.Error) as e:
            raise BootstrapError(f"unreachable: {self.host.key}: connection lost:"
                                 f" {getattr(e, 'reason', e)}") from None
        code = done.exit_status if done.exit_status is not None else -1
        return _Done(code, _text(done.stdout), _text(done.stderr))

    async def sh(self, script: str, *args: str, before: str = "",
                 timeout: float = STEP_TIMEOUT) -> _Done:
        """`script` run by `sh -s -- ARGS` in the home folder, after `before` (shell lines:
        exports, variables); all of it on standard input. What the login shell printed before
        it (a chatty ~/.bashrc) is left out of its output."""
        command = "sh -s -- " + shlex.join(args) if args else "sh -s"
        done = await self.run(command, f'cd "$HOME" || exit 1\necho {_START}\n{before}{script}',
                              timeout)
        _, marker, rest = done.stdout.partition(f"{_START}\n")
        return dataclasses.replace(done, stdout=rest) if marker else done

    async def put(self, path: str, data: bytes, mode: int = 0o600) -> None:
        conn = await self.connection()
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.makedirs(posixpath.dirname(path), exist_ok=True)
                async with sftp.open(path, "wb") as f:
                    await f.write(data)
                await sftp.chmod(path, mode)
        except (OSError, asyncssh.Error) as e:
            raise BootstrapError(f"could not copy {posixpath.basename(path)} to"
                                 f" {self.host.entry} over SFTP: {getattr(e, 'reason', e)}"
                                 ) from None

    # -- state --------------------------------------------------------------------------------
    async def write_state(self, worker_id: str, state: Mapping[str, object]) -> None:
        path = shlex.quote(self.file(worker_id, "state"))
        await self.sh(f"mkdir -p {shlex.quote(self.fleet_dir)} &&"
                      f" printf %s {shlex.quote(state_text(state))} > {path}.tmp &&"
                      f" mv {path}.tmp {path}\n")

    async def setup_tail(self, worker_id: str) -> tuple[str, ...]:
        """The setup log's last lines (none when the host cannot be reached)."""
        if self._conn is None:
            return ()
        try:
            done = await self.sh(f"tail -n {TAIL} {shlex.quote(self.file(worker_id, 'setup.log'))}"
                                 " 2>/dev/null\n")
        except BootstrapError:
            return ()
        return tuple(done.stdout.splitlines())

    async def _touching(self) -> None:
        """While bootstraps are under way here, touch their state files every TOUCH_EVERY
        seconds (one command for them all)."""
        while self._underway:
            await asyncio.sleep(TOUCH_EVERY)
            paths = [self.file(w, "state") for w in sorted(self._underway)]
            if paths:
                with contextlib.suppress(BootstrapError):
                    await self.sh(f"touch -c {shlex.join(paths)}\n")

    # -- bootstrap ----------------------------------------------------------------------------
    async def bootstrap(self, worker_id: str, spec: LaunchSpec, state: Mapping[str, object],
                        note: str) -> None:
        """Make the worker run here: Python checked, jobfleet installed, setup run, worker
        started; the state file says `bootstrapping`, then `ready`. Raises BootstrapError.
        At most BOOTSTRAPS_AT_ONCE run at once on a host (the others wait their turn)."""
        async with self._bootstraps:
            self._underway.add(worker_id)
            if self._toucher is None or self._toucher.done():
                self._toucher = asyncio.get_running_loop().create_task(self._touching())
            try:
                await self._bootstrap(worker_id, spec, state, note)
            finally:
                self._underway.discard(worker_id)

    async def _bootstrap(self, worker_id: str, spec: LaunchSpec, state: Mapping[str, object],
                         note: str) -> None:
        wheel = build_wheel()
        if self.access.install == "auto" and spec.version and spec.version != wheel.version:
            raise BootstrapError(f"this jobfleet is {wheel.version}: it cannot install"
                                 f" {spec.version} on hosts")
        venv = f"{BASE}/venv-{wheel.version}"
        before = (f"state={shlex.quote(state_text({**state, 'phase': 'bootstrapping'}))}\n"
                  f"note={shlex.quote(note)}\n")
        done = await self.sh(scripts.BEGIN, self.fleet_dir, worker_id, self.access.python,
                             self.access.install, venv, before=before)
        facts = dict(line.partition("=")[::2] for line in done.stdout.splitlines() if "=" in line)
        python = self._check_python(facts, done)
        if self.access.install == "auto":
            if not _installed(facts.get("build", ""), wheel.build, extras_for(spec.worker_env())):
                await self._install(worker_id, python, venv, spec)
            python = f"{venv}/bin/python"
        else:
            self._check_installed(facts, python, spec)
        if self.access.setup:
            await self._setup(worker_id, python)
        await self._start(worker_id, python, spec, state)

    def _check_python(self, facts: Mapping[str, str], done: _Done) -> str:
        py = self.access.python
        if done.returncode != 0 or "python" not in facts:
            raise BootstrapError(f"could not prepare ~/{BASE}:"
                                 f" {(done.stderr or done.stdout).strip()[:200]}")
        if facts["python"] == "missing":
            raise BootstrapError(f"no {py} on the host (install Python"
                                 f" {_dotted(MIN_PYTHON)} or newer, or set python in"
                                 " [providers.ssh])")
        try:
            version = tuple(int(p) for p in facts["python"].split("."))
        except ValueError:
            raise BootstrapError(f"{py} did not say its version") from None
        if version[:2] < MIN_PYTHON:
            raise BootstrapError(f"{py} is Python {facts['python']};"
                                 f" jobfleet needs {_dotted(MIN_PYTHON)} or newer (install it,"
                                 " or point python in [providers.ssh] at one)")
        return facts.get("executable") or py

    async def _install(self, worker_id: str, python: str, venv: str, spec: LaunchSpec) -> None:
        """This very jobfleet into `venv` (made if absent)."""
        wheel = build_wheel()
        extras = ",".join(extras_for(spec.worker_env()))
        async with self._installing:  # one copy per host at a time; the next finds it there
            path = f"{BASE}/wheels/{wheel.build}-{worker_id}/{wheel.name}"
            await self.put(path, wheel.data, 0o644)
            args = [venv, path, wheel.build, extras, self.file(worker_id, "setup.log")]
            done = await self.run(shlex.join([python, "-", *args]), scripts.INSTALL,
                                  INSTALL_TIMEOUT)
        if done.returncode == 3:
            raise BootstrapError(f"{python} -m venv failed (on Debian or"
                                 " Ubuntu: apt-get install python3-venv)")
        if done.returncode != 0:
            raise BootstrapError(f"pip could not install jobfleet into ~/{venv} on"
                                 f" {self.host.entry} (exit status {done.returncode}; can the"
                                 " host reach the package index?)")

    def _check_installed(self, facts: Mapping[str, str], python: str, spec: LaunchSpec) -> None:
        version = facts.get("jobfleet", "missing")
        if version == "missing":
            raise BootstrapError(f"{python} cannot import jobfleet"
                                 " (install = never: install it there, or set install = auto)")
        if spec.version and version != spec.version:
            raise BootstrapError(f"the host has jobfleet {version}, this fleet needs"
                                 f" {spec.version} (install = never)")

    async def _setup(self, worker_id: str, python: str) -> None:
        assert self.access.setup is not None
        text = Path(self.access.setup).read_text()
        end = f"JOBFLEET_SETUP_{secrets.token_hex(8)}"
        env = {"JOBFLEET_FLEET": self.fleet, "JOBFLEET_WORKER_ID": worker_id,
               "JOBFLEET_PYTHON": python}
        before = (f"cat > {shlex.quote(self.file(worker_id, 'setup.sh'))} <<'{end}'\n"
                  f"{text}{'' if text.endswith(chr(10)) else chr(10)}{end}\n"
                  + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        done = await self.sh(scripts.SETUP, self.fleet_dir, worker_id, before=before,
                             timeout=SETUP_TIMEOUT)
        lines = done.stdout.splitlines()
        status = lines[0].partition("=")[2] if lines and lines[0].startswith("status=") else ""
        if status != "0":
            raise BootstrapError(f"the setup script {Path(self.access.setup).name} exited"
                                 f" {status or 'abnormally'}", lines[1:])

    async def _start(self, worker_id: str, python: str, spec: LaunchSpec,
                     state: Mapping[str, object]) -> None:
        command = [python, "-m", "jobfleet", "worker", *spec.worker_args(worker_id)]
        before = spec.exports() + f"ready={shlex.quote(state_text({**state, 'phase': 'ready'}))}\n"
        done = await self.sh(scripts.START, self.fleet_dir, worker_id, str(READY_WAIT), *command,
                             before=before, timeout=STEP_TIMEOUT + READY_WAIT)
        lines = done.stdout.splitlines()
        if not lines or lines[0] not in ("ready", "started"):
            raise BootstrapError(f"the worker exited as it started (its"
                                 f" log: ~/{self.file(worker_id, 'log')})", lines[1:])

    # -- list and stop ------------------------------------------------------------------------
    async def list(self) -> list[Found]:
        return parse_list((await self.sh(scripts.LIST, self.fleet_dir)).stdout)

    async def terminate(self, worker_ids: Sequence[str], grace: float) -> None:
        done = await self.sh(scripts.TERMINATE, self.fleet_dir, str(int(grace)), *worker_ids,
                             timeout=grace + 60)
        for line in done.stdout.splitlines():
            log.warning("%s: %s", self.host.entry, line)


def state_text(state: Mapping[str, object]) -> str:
    """A state file: `key=value` lines (values on one line)."""
    return "".join(f"{k}={' '.join(str(v).split())}\n" for k, v in state.items()
                   if v is not None)


def _installed(stamp: str, build: str, extras: Sequence[str]) -> bool:
    """Does a virtualenv whose jobfleet-build says `stamp` hold `build` with `extras`?"""
    words = stamp.split()
    return words[:1] == [build] and set(extras) <= set(words[1:])


def quiet_asyncssh() -> None:
    """asyncssh logs every channel at INFO: keep it to warnings unless told otherwise."""
    logger = logging.getLogger("asyncssh")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class _Done:
    returncode: int
    stdout: str
    stderr: str


#: what a script prints first: its output starts after it
_START = "@@jobfleet"


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def extras_for(env: Mapping[str, str]) -> list[str]:
    """The extras a worker with this environment needs: postgres for a PostgreSQL store, s3
    for an S3 blob store, gateway for a `jobfleet server`."""
    extras = []
    if env.get("JOBFLEET_SERVER"):
        extras.append("gateway")
    if env.get("JOBFLEET_STORE", "").startswith(("postgresql:", "postgres:")):
        extras.append("postgres")
    if env.get("JOBFLEET_BLOBS", "").startswith("s3:"):
        extras.append("s3")
    return extras


def parse_list(text: str) -> list[Found]:
    """The output of the LIST script, one Found per worker."""
    found: list[Found] = []
    current: dict[str, Any] | None = None
    section = ""

    def flush() -> None:
        if current is not None:
            found.append(Found(current["id"], current["state"], current["stale"], current["old"],
                               current["pid"], current["alive"], tuple(current["setup"]),
                               tuple(current["log"])))

    for line in text.splitlines():
        if line.startswith("@@worker "):
            flush()
            current = {"id": line[9:], "state": {}, "stale": False, "old": False, "pid": None,
                       "alive": False, "setup": [], "log": []}
            section = ""
        elif current is None:
            continue
        elif line.startswith("|") and section in ("setup", "log"):
            current[section].append(line[1:])
        elif line.startswith("="):
            key, _, value = line[1:].partition("=")
            current["state"][key] = value
        elif line in ("@@stale", "@@old"):
            current[line[2:]] = True
        elif line.startswith(("@@alive ", "@@dead ")):
            word, _, pid = line[2:].partition(" ")
            current["pid"] = int(pid) if pid.isdigit() else None
            current["alive"] = word == "alive"
        elif line in ("@@setup", "@@log"):
            section = line[2:]
        elif line == "@@end":
            break
    flush()
    return found
