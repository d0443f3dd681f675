"""The worker's side of the gateway, /v1/worker/NAME: register, state, lease, exchange, finish,
heartbeat, stalled, logs, next_due (POST, JSON bodies), cancels and wait (GET).

These are nearly all of a busy server's requests, so a small ASGI app answers them in front of
FastAPI: one JSON body in, one out, the token checked and the store called in one trip to a
worker thread. Every body may carry `logs`, chunks of running jobs' logs, stored first.
The client's side and blobs (routes.py) are FastAPI's, with their OpenAPI schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio

from jobfleet.blobs import LocalBlobs
from jobfleet.errors import ConfigError, JobfleetError, NotFound, SpecError
from jobfleet.gateway import wire
from jobfleet.gateway.access import BadRequest, Gate, Refused
from jobfleet.gateway.tokens import Principal
from jobfleet.store import UNSTARTED, Lease, Outcome

PREFIX = "/v1/worker/"
#: the longest lease a worker may ask for, seconds
_LONGEST_LEASE = 7 * 24 * 3600.0
#: a store failing with one of these is away for now: the client tries again (HTTP 503)
AWAY = ("lost the connection", "cannot connect", "could not get it back")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Call:
    """One request: who sent it, whether it is sent again after a lost answer, its body and
    query parameters."""

    gate: Gate
    who: Principal
    retrying: bool
    body: dict[str, Any]
    params: dict[str, str]

    def worker(self) -> str:
        """The worker id the request is for, refused unless this token may act as it."""
        worker_id = str(self.body["worker"] if "worker" in self.body else self.params["worker"])
        self.gate.worker(self.who, worker_id)
        return worker_id


def error_answer(e: Exception) -> tuple[int, dict[str, Any]]:
    """The status and JSON body that tell a client what went wrong."""
    if isinstance(e, Refused):
        return e.status, {"detail": e.message, "hint": e.hint}
    if isinstance(e, BadRequest):
        return 400, {"detail": e.message, "hint": e.hint}
    if isinstance(e, JobfleetError):
        status = 404 if isinstance(e, NotFound) else 400 if isinstance(
            e, SpecError | ConfigError) else 503 if e.message.startswith(AWAY) else 400
        return status, {"detail": e.message, "hint": e.hint}
    return 400, {"detail": f"malformed request: {type(e).__name__}: {e}",
                 "hint": "a jobfleet worker of the same version as the server sends"
                         " well-formed requests"}


# -- logs -------------------------------------------------------------------------------------
def store_logs(call: Call) -> list[dict[str, str]]:
    """Write each log chunk the request carries where it goes (at its offset: a chunk sent
    twice is stored once); returns those refused, with why."""
    refused = []
    for chunk in call.body.get("logs") or ():
        key = str(chunk["key"])
        try:
            if not key.startswith("logs/"):
                raise Refused(f"{key} is not a log")
            call.gate.blob(call.who, key, write=True)
        except Refused as e:
            refused.append({"key": key, "why": e.message})
            continue
        write_chunk(call.gate.blobs, key, int(chunk["offset"]), int(chunk["number"]),
                    wire.unb64(chunk["data"]) or b"")
    return refused


def write_chunk(store: object, key: str, offset: int, number: int, data: bytes) -> None:
    """Store one chunk of a log: at its offset in a local file, or as chunk `number` of a log
    in an object store (see blobs.remote)."""
    if isinstance(store, LocalBlobs):
        path = store.local_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        finally:
            os.close(fd)
        return
    from jobfleet.blobs.remote import FsspecBlobs

    if not isinstance(store, FsspecBlobs):
        raise BadRequest(f"the blob store {getattr(store, 'url', store)} cannot take logs in"
                         " pieces")
    store.put_chunk(key, number, data)


# -- leases and outcomes ------------------------------------------------------------------------
def _lease_args(call: Call) -> dict[str, Any]:
    seconds = float(call.body["lease_seconds"])
    if not 0 < seconds <= _LONGEST_LEASE:
        raise BadRequest(f"lease_seconds {seconds:g} is out of range",
                         f"ask for more than 0 and at most {_LONGEST_LEASE:g} seconds")
    free = wire.capacity_of(call.body["free"])
    assert free is not None
    return {"free": free, "lease_seconds": seconds,
            "run_id": call.gate.worker_run(call.who, call.body.get("run")),
            "ahead": wire.capacity_of(call.body.get("ahead"))}


def _lost_leases(call: Call, worker_id: str) -> list[Lease]:
    """After a lost answer: the leases the worker holds in the store but does not know of."""
    known = {(int(k), str(t)) for k, t in call.body.get("held") or ()}
    return [x for x in call.gate.db.held(worker_id) if (x.key, x.token) not in known]


def _pairs(outcomes: list[Outcome]) -> list[tuple[int, str]]:
    return [(o.key, o.token) for o in outcomes]


def _finish(call: Call, worker_id: str, outcomes: list[Outcome]) -> list[int]:
    """Record outcomes of the worker's own leases (the others are stale, like a stale token);
    after a lost answer, one the first try recorded is not called stale."""
    gate, store = call.gate, call.gate.store()
    theirs = {k for k, _ in gate.theirs(call.who, worker_id, _pairs(outcomes))}
    mine = [o for o in outcomes if o.key not in theirs]
    stale = set(store.finish(worker_id, mine) if mine else []) | theirs
    gate.handed(worker_id, (), _pairs(outcomes))
    if call.retrying and stale:
        by_key = {o.key: o for o in outcomes}
        stale = {k for k in stale if by_key[k].status == UNSTARTED or not any(
            a.worker_id == worker_id and a.state == by_key[k].status
            for a in store.attempts(k))}
    return [o.key for o in outcomes if o.key in stale]


def _handing(call: Call, worker_id: str, leases: list[Lease]) -> list[dict[str, Any]]:
    """`leases` as the answer hands them to the worker (noted as its own)."""
    call.gate.handed(worker_id, ((x.key, x.token) for x in leases))
    return [wire.lease_json(x) for x in leases]


# -- the handlers -----------------------------------------------------------------------------
def register(call: Call) -> dict[str, Any]:
    """A worker starts: its id is bound to this token (refused if another token has it)."""
    info = wire.worker_of(call.body["worker"])
    call.gate.worker(call.who, info.id, register=True)
    run_id = call.gate.worker_run(call.who, info.run_id)
    if run_id != info.run_id:
        info = wire.worker_of({**wire.record_json(info), "run_id": run_id})
    call.gate.store().register_worker(info)
    return {}


def state(call: Call) -> dict[str, Any]:
    worker_id = call.worker()
    call.gate.store().set_worker_state(worker_id, str(call.body["state"]),
                                       call.body.get("jobs_done"))
    if call.body["state"] == "stopped":
        call.gate.forget_handed(worker_id)
    return {}


def lease(call: Call) -> dict[str, Any]:
    worker_id = call.worker()
    args = _lease_args(call)
    leases = (_lost_leases(call, worker_id) if call.retrying else []) \
        or call.gate.store().lease(worker_id, **args)
    return {"leases": _handing(call, worker_id, leases)}


def exchange(call: Call) -> dict[str, Any]:
    """Report outcomes and lease more, in one transaction of the store."""
    worker_id = call.worker()
    outcomes = [wire.outcome_of(o) for o in call.body["outcomes"]]
    args = _lease_args(call)
    store = call.gate.store()
    if call.retrying or call.gate.theirs(call.who, worker_id, _pairs(outcomes)):
        stale = _finish(call, worker_id, outcomes)
        leases = (_lost_leases(call, worker_id) if call.retrying else []) \
            or store.lease(worker_id, **args)
    else:
        stale, leases = store.exchange(worker_id, outcomes, args["free"], args["lease_seconds"],
                                       args["run_id"], args["ahead"])
        call.gate.handed(worker_id, (), _pairs(outcomes))
    return {"stale": stale, "leases": _handing(call, worker_id, leases)}


def finish(call: Call) -> dict[str, Any]:
    worker_id = call.worker()
    outcomes = [wire.outcome_of(o) for o in call.body["outcomes"]]
    return {"stale": _finish(call, worker_id, outcomes) if outcomes else []}


def heartbeat(call: Call) -> dict[str, Any]:
    """Extend the leases still held; say which are lost and which jobs to cancel."""
    worker_id = call.worker()
    held = [(int(k), str(t)) for k, t in call.body["leases"]]
    theirs = call.gate.theirs(call.who, worker_id, held)
    beat = call.gate.store().heartbeat(worker_id, [x for x in held if x not in theirs],
                                       float(call.body["lease_seconds"]),
                                       call.body.get("jobs_done"))
    lost = beat.lost | {k for k, _ in theirs}
    call.gate.handed(worker_id, (), [x for x in held if x[0] in lost])
    return {"lost": sorted(lost), "cancel": sorted(beat.cancel)}


def stalled(call: Call) -> dict[str, Any]:
    worker_id = call.worker()
    key, token, quiet = int(call.body["key"]), str(call.body["token"]), call.body.get("quiet_for")
    held = not call.gate.theirs(call.who, worker_id, [(key, token)]) and \
        call.gate.store().mark_stalled(worker_id, key, token,
                                       None if quiet is None else float(quiet))
    return {"held": held}


def cancels(call: Call) -> dict[str, Any]:
    return {"cancel": sorted(call.gate.store().cancel_requests(call.worker()))}


def next_due(call: Call) -> dict[str, Any]:
    call.gate.worker_role(call.who)
    total = wire.capacity_of(call.body["total"])
    assert total is not None
    run_id = call.gate.worker_run(call.who, call.body.get("run"))
    return {"due": call.gate.store().next_due(total, run_id)}


def logs(call: Call) -> dict[str, Any]:
    call.gate.worker_role(call.who)
    return {}  # the chunks are stored before any handler runs


HANDLERS: dict[tuple[str, str], Callable[[Call], dict[str, Any]]] = {
    ("POST", "register"): register, ("POST", "state"): state, ("POST", "lease"): lease,
    ("POST", "exchange"): exchange, ("POST", "finish"): finish,
    ("POST", "heartbeat"): heartbeat, ("POST", "stalled"): stalled,
    ("POST", "next_due"): next_due, ("POST", "logs"): logs, ("GET", "cancels"): cancels,
}


def handle(gate: Gate, handler: Callable[[Call], dict[str, Any]], secret: str | None,
           retrying: bool, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    """Check the token, store the log chunks, run the handler (in a worker thread)."""
    call = Call(gate, gate.principal(secret), retrying, body, params)
    gate.worker_role(call.who)
    if handler is not register and ("worker" in body or "worker" in params):
        call.worker()  # before its log chunks are looked at
    refused = store_logs(call)
    answer = handler(call)
    if refused:
        answer["logs_refused"] = refused
    return answer


class WorkerAPI:
    """ASGI: /v1/worker/... answered here, everything else (and lifespan) by `app`."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app, self.gate = app, gate

    def release(self) -> None:
        """Let every worker waiting for work go (the server is stopping)."""
        from jobfleet.gateway.server import WorkAnnouncer

        if isinstance(self.gate.announcer, WorkAnnouncer):
            self.gate.announcer.release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        name, method = path[len(PREFIX):], scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        secret = _bearer(headers)
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        try:
            if (method, name) == ("GET", "wait"):
                answer = await self._wait(secret, params)
            elif (handler := HANDLERS.get((method, name))) is None:
                raise Refused(f"there is no {method} {path} on this server",
                              "the worker and the server may be of different jobfleet"
                              " versions", 404)
            else:
                raw = await _body(receive)
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise BadRequest("the request's body is not a JSON object")
                answer = await anyio.to_thread.run_sync(
                    handle, self.gate, handler, secret,
                    bool(headers.get(wire.RETRY_HEADER.lower())), body, params)
            status = 200
        except (JobfleetError, Refused, BadRequest, KeyError, TypeError, ValueError) as e:
            status, answer = error_answer(e)
        data = json.dumps(answer, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _wait(self, secret: str | None, params: dict[str, str]) -> dict[str, Any]:
        """Wait (up to `timeout` s, at most 60) for news of work past `since`."""
        from jobfleet.gateway.server import WorkAnnouncer

        who = await anyio.to_thread.run_sync(self.gate.principal, secret)
        self.gate.worker_role(who)
        announcer = self.gate.announcer
        assert isinstance(announcer, WorkAnnouncer)
        timeout = min(max(float(params.get("timeout", 0)), 0.0), 60.0)
        return {"generation": await announcer.wait(int(params["since"]), timeout)}


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away before its request was read")
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def _bearer(headers: dict[str, str]) -> str | None:
    sent = headers.get("x-jobfleet-token")
    if sent:
        return sent
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
