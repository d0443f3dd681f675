"""Who may do what through the gateway: tokens checked (and cached briefly), worker ids bound to
the token that registered them, runs to the token that submitted them, blob keys to the jobs
that own them. Every refusal says what was refused and why."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import Request

from jobfleet.dashboard.access import StorePerThread, Token
from jobfleet.gateway.db import GatewayDB
from jobfleet.gateway.tokens import ADMIN, CLIENT, WORKER, Principal, digest
from jobfleet.store import Store

#: how long a token that was checked is believed without asking the database again, seconds
#: (a revoked token stops working within this long)
TOKEN_CACHE_SECONDS = 5.0
#: blob kinds kept per run: KIND/RUN/...
RUN_KINDS = ("logs", "results", "outputs", "payloads")
_LOG = re.compile(r"(\d+)-(\d+)\.log\Z")
_RESULT = re.compile(r"(\d+)-(\d+)\.pkl\Z")
_FUNCTION = re.compile(r"[0-9a-f]{16,64}\.pkl\Z")


class Refused(Exception):
    """A request this token may not make (403), or a token that is not valid (401)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 403) -> None:
        super().__init__(message)
        self.message, self.hint, self.status = message, hint, status


class BadRequest(Exception):
    """A request that does not make sense (400)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def _role_hint(p: Principal) -> str:
    if p.role == WORKER:
        return ("a worker token may only lease jobs (of its run, when it names one), report on"
                " its own leases and store their logs, results and outputs; use a client token"
                " (`jobfleet token create --role client`) to submit and read runs")
    if p.role == CLIENT:
        return ("a client token may submit runs and read and act on its own; workers need a"
                " worker token (`jobfleet token create --role worker`)")
    return "an admin token may do everything"


@dataclass
class Gate:
    """What the gateway's routes share: the store (one per thread), the blobs, its tables and
    the caches of checked tokens and worker bindings."""

    stores: StorePerThread
    blobs: object  # jobfleet.blobs.Blobs (typed loosely: the routes narrow it)
    db: GatewayDB
    announcer: object  # jobfleet.gateway.server.WorkAnnouncer
    _principals: dict[str, tuple[Principal | None, float]] = field(default_factory=dict)
    _bound: set[tuple[str, str]] = field(default_factory=set)
    #: the leases (key, token) this server handed to each worker and that are not reported yet
    _handed: dict[str, set[tuple[int, str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self) -> Store:
        return self.stores.get()

    # -- tokens -----------------------------------------------------------------------------
    def principal(self, secret: str | None) -> Principal:
        if not secret:
            raise Refused("this request carries no token",
                          "send 'Authorization: Bearer TOKEN' (a token from `jobfleet token"
                          " create` on the server)", 401)
        hashed, now = digest(secret), time.monotonic()
        with self._lock:
            cached = self._principals.get(hashed)
        if cached is not None and cached[1] > now:
            found = cached[0]
        else:
            found = self.db.principal(hashed)
            with self._lock:
                if len(self._principals) > 10_000:
                    self._principals.clear()
                self._principals[hashed] = (found, now + TOKEN_CACHE_SECONDS)
        if found is None:
            raise Refused("the token is not known to this server, or was revoked",
                          "make a new one with `jobfleet token create` where the server runs",
                          401)
        return found

    # -- workers ----------------------------------------------------------------------------
    @staticmethod
    def worker_role(p: Principal) -> None:
        if p.role not in (WORKER, ADMIN):
            raise Refused(f"a {p.role} token cannot do a worker's work", _role_hint(p))

    def worker(self, p: Principal, worker_id: str, *, register: bool = False) -> None:
        """Refuse unless `p` may act as worker `worker_id` (binding it when it registers)."""
        if p.role == ADMIN:
            return
        if p.role != WORKER:
            raise Refused(f"a {p.role} token cannot act as a worker (worker {worker_id})",
                          _role_hint(p))
        if (worker_id, p.token_id) in self._bound:
            return
        if register and self.db.worker_token(worker_id) is None \
                and self.db.worker_state(worker_id) in ("running", "draining"):
            raise Refused(f"worker {worker_id} is running, connected to the store itself: a"
                          " worker token cannot take its id", "give this worker another --id")
        owner = (self.db.bind_worker(worker_id, p.token_id) if register
                 else self.db.worker_token(worker_id))
        if owner is None:
            raise Refused(f"worker {worker_id} has not registered with this token",
                          "a worker registers when it starts; restart it with this token")
        if owner != p.token_id:
            raise Refused(f"worker {worker_id} belongs to another token ({owner}): this token"
                          " cannot report for it", "give each worker its own id (--id)")
        with self._lock:
            if len(self._bound) > 100_000:
                self._bound.clear()
            self._bound.add((worker_id, p.token_id))

    def handed(self, worker_id: str, leases: Iterable[tuple[int, str]],
               gone: Iterable[tuple[int, str]] = ()) -> None:
        """Note leases handed to a worker, and those it has reported on (`gone`)."""
        with self._lock:
            if len(self._handed) > 100_000:  # workers that died holding leases: forget them
                self._handed.clear()  # (the store is asked instead)
            held = self._handed.setdefault(worker_id, set())
            held.difference_update(gone)
            held.update(leases)
            if not held:
                del self._handed[worker_id]

    def forget_handed(self, worker_id: str) -> None:
        with self._lock:
            self._handed.pop(worker_id, None)

    def theirs(self, p: Principal, worker_id: str,
               leases: Iterable[tuple[int, str]]) -> set[tuple[int, str]]:
        """The leases (key, token) a worker token names without holding them: not handed to
        its worker here, and (asked when not known here, as after a restart) not running on
        it in the store. An admin may name any."""
        if p.role == ADMIN:
            return set()
        with self._lock:
            unknown = set(leases) - self._handed.get(worker_id, set())
        if unknown:
            running = self.db.running_on(worker_id)
            found = {x for x in unknown if x[0] in running}
            self.handed(worker_id, found)
            unknown -= found
        return unknown

    def worker_run(self, p: Principal, run_id: str | None) -> str | None:
        """The run a worker may lease from: its token's, when it names one."""
        if p.run_id is None or p.role == ADMIN:
            return run_id
        if run_id is not None and run_id != p.run_id:
            raise Refused(f"this worker token serves run {p.run_id} only, not run {run_id}",
                          f"start the worker with --run {p.run_id}, or with a token for"
                          f" run {run_id}")
        return p.run_id

    # -- runs -------------------------------------------------------------------------------
    def may_submit(self, p: Principal) -> None:
        if p.role == WORKER:
            raise Refused("a worker token cannot submit jobs", _role_hint(p))
        if p.role == CLIENT and p.run_id is not None:
            raise Refused(f"this client token is for run {p.run_id} only: it cannot submit new"
                          " runs", "use a client token made without --run")

    def run(self, p: Principal, run_id: str, *, lookup: bool = False) -> None:
        """Refuse unless `p` may read and act on the run (`lookup`: see that it exists, as
        a worker does when it is started for one run)."""
        if p.role == ADMIN:
            return
        if p.role == WORKER:
            if lookup and p.run_id in (None, run_id):
                return
            raise Refused(f"a worker token cannot read run {run_id}: its jobs, results and"
                          " logs are for the client that submitted it", _role_hint(p))
        if p.run_id is not None:
            if run_id != p.run_id:
                raise Refused(f"this client token is for run {p.run_id} only, not run {run_id}",
                              _role_hint(p))
            return
        owner = self.db.run_owner(run_id)
        if owner != p.token_id:
            raise Refused(f"run {run_id} was not submitted with this token",
                          "a client token reads the runs it submitted; an admin token reads"
                          " every run")

    # -- blobs ------------------------------------------------------------------------------
    def blob(self, p: Principal, key: str, *, write: bool) -> None:
        """Refuse unless `p` may read (or write) the blob `key`."""
        parts = _parts(key)
        kind = parts[0]
        if kind == "functions" and len(parts) == 2 and _FUNCTION.match(parts[1]):
            if write and p.role == WORKER:
                raise Refused(f"a worker token cannot store {key}", _role_hint(p))
            return  # named by the digest of its content: knowing the name is the permission
        if p.role == ADMIN:
            return
        if kind not in RUN_KINDS or len(parts) < 3:
            raise Refused(f"a {p.role} token cannot reach {key}",
                          "only an admin token reaches blobs outside logs/, results/, outputs/,"
                          " payloads/ and functions/")
        run_id = parts[1]
        if p.role == WORKER:
            self._worker_blob(p, key, kind, run_id, parts, write)
        elif write and kind == "payloads" and not self.db.run_exists(run_id) \
                and p.role == CLIENT and p.run_id is None:
            return  # a call's arguments, stored before its run is submitted
        else:
            self.run(p, run_id)

    def _worker_blob(self, p: Principal, key: str, kind: str, run_id: str,
                     parts: list[str], write: bool) -> None:
        if not write:
            if kind == "payloads" and self.db.runs_a_job_of(p.token_id, run_id):
                return
            raise Refused(f"a worker token cannot read {key}",
                          "workers read only the arguments of calls they run")
        name = parts[2] if len(parts) == 3 else None
        pattern = {"logs": _LOG, "results": _RESULT}.get(kind)
        if pattern is not None:
            m = pattern.match(name or "")
            if m is None:
                raise Refused(f"{key} is not where a job's {kind[:-1]} goes")
            seq, attempt = int(m[1]), int(m[2])
        elif kind == "outputs" and parts[2].isdigit() and len(parts) > 3:
            seq, attempt = int(parts[2]), 0
        else:
            raise Refused(f"a worker token cannot store {key}", _role_hint(p))
        held = self.db.attempt_held(p.token_id, run_id, seq)
        if held is None or (attempt and held != attempt):
            raise Refused(f"{key}: job {run_id}-{seq}"
                          + (f" attempt {attempt}" if attempt else "")
                          + " is not running on a worker of this token",
                          "a worker stores only the logs, results and outputs of the jobs it"
                          " holds (its lease may have expired)")

    def prefix(self, p: Principal, prefix: str, *, write: bool) -> None:
        """Refuse unless `p` may list (or delete) the blobs under `prefix`."""
        parts = _parts(prefix)
        if p.role == ADMIN:
            return
        if p.role == WORKER or parts[0] not in RUN_KINDS or len(parts) < 2:
            raise Refused(f"a {p.role} token cannot {'delete' if write else 'list'} {prefix}",
                          _role_hint(p))
        self.run(p, parts[1])


def _parts(key: str) -> list[str]:
    parts = key.split("/")
    if "\\" in key or key.startswith("/") or any(x in ("", ".", "..") for x in parts):
        raise Refused(f"{key!r} is not a blob key", "keys are relative paths such as"
                      " logs/RUN/7-1.log", 400)
    return parts


def bearer(request: Request) -> str | None:
    return Token.from_headers(request.headers)
