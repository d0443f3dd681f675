"""The gateway's FastAPI routes: /v1/client (submit, runs, jobs, results, cancel, retry) and
/v1/blobs; each checks its token (see access.py) before it touches the store. The worker's
side, /v1/worker, is worker_api.py's."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from starlette.concurrency import run_in_threadpool

from jobfleet.blobs import Blobs
from jobfleet.errors import NotFound
from jobfleet.gateway import wire
from jobfleet.gateway.access import Gate, Refused, bearer
from jobfleet.gateway.tokens import ADMIN, WORKER, Principal
from jobfleet.spec.model import JobSpec
from jobfleet.store import Store, state_filter

Json = Annotated[dict[str, Any], Body()]
client = APIRouter(prefix="/v1/client", tags=["client"])
blobs = APIRouter(prefix="/v1/blobs", tags=["blobs"])


def _ok(value: Any) -> Response:
    return Response(json.dumps(value, separators=(",", ":")), media_type="application/json")


def _who(request: Request) -> tuple[Gate, Principal]:
    gate: Gate = request.app.state.gate
    return gate, gate.principal(bearer(request))


def _retrying(request: Request) -> bool:
    return bool(request.headers.get(wire.RETRY_HEADER))


# -- the client's side ------------------------------------------------------------------------
def _specs(body: dict[str, Any]) -> tuple[list[JobSpec], list[bytes] | None]:
    specs = [JobSpec.from_json(s) for s in body["jobs"]]
    pays = body.get("payloads")
    return specs, None if pays is None else [wire.unb64(x) or b"" for x in pays]


@client.post("/runs", summary="Submit a run (all its jobs, or none)")
def submit(request: Request, body: Json) -> Response:
    gate, p = _who(request)
    gate.may_submit(p)
    run = wire.new_run_of(body["run"])
    specs, payloads = _specs(body)
    store = gate.store()
    if _retrying(request) and run.id and gate.db.run_exists(run.id) \
            and gate.db.run_owner(run.id) in (None, p.token_id) \
            and store.run(run.id).total == len(specs):
        gate.db.own_run(run.id, p.token_id)  # the first try's answer was lost
        return _ok({"run": run.id})
    if run.id and gate.db.run_exists(run.id):
        raise Refused(f"a run {run.id} exists already", "let the server choose the id", 409)
    run_id = store.submit(run, specs, payloads)
    gate.db.own_run(run_id, p.token_id)
    return _ok({"run": run_id})


@client.post("/runs/{run_id}/jobs", summary="Add jobs to a run")
def append(request: Request, run_id: str, body: Json) -> Response:
    gate, p = _who(request)
    if p.role == WORKER:
        gate.may_submit(p)  # refused as a submission, whichever run it names
    gate.run(p, run_id)
    specs, payloads = _specs(body)
    store = gate.store()
    asked = body.get("request")
    if _retrying(request) and asked:  # did the first try append them?
        first = store.appended_by(run_id, str(asked))
        if first is not None:
            return _ok({"first": first})
    return _ok({"first": store.append(run_id, specs, payloads, request=asked)})


@client.get("/runs", summary="Runs this token may read, newest first (or by id prefix)")
def runs(request: Request, limit: int = 50, prefix: str | None = None) -> Response:
    gate, p = _who(request)
    store = gate.store()
    limit = max(1, min(limit, 1000))
    if p.role == ADMIN:
        found = store._runs_by_prefix(prefix) if prefix else store.runs(limit)
    elif p.run_id is not None:
        found = [r for r in store._runs_by_prefix(p.run_id) if r.id == p.run_id
                 and r.id.startswith(prefix or "")]
    elif p.role == WORKER:
        if not prefix:
            raise Refused("a worker token cannot list runs",
                          "it may look up one run by its id (as `worker --run RUN` does)")
        found = store._runs_by_prefix(prefix)
    else:
        ids = gate.db.owned_runs(p.token_id, 1000 if prefix else limit, prefix or "")
        found = [store.run(i) for i in (sorted(ids)[:2] if prefix else ids)]
    return _ok({"runs": [wire.record_json(r) for r in found]})


@client.get("/runs/{run_id}/pending", summary="Jobs still queued or running")
def pending(request: Request, run_id: str) -> Response:
    gate, p = _who(request)
    gate.run(p, run_id, lookup=True)
    return _ok({"pending": gate.store().pending(run_id)})


def _reader(request: Request, run_id: str) -> Store:
    gate, p = _who(request)
    gate.run(p, run_id)
    return gate.store()


@client.get("/runs/{run_id}/counts", summary="Jobs per state")
def counts(request: Request, run_id: str) -> Response:
    return _ok({"counts": _reader(request, run_id).counts(run_id)})


@client.get("/runs/{run_id}/jobs", summary="A run's jobs")
def jobs(request: Request, run_id: str, state: str | None = None,
         limit: int | None = None) -> Response:
    found = _reader(request, run_id).jobs(run_id, state_filter(state), limit)
    return _ok({"jobs": [wire.record_json(j) for j in found]})


@client.get("/runs/{run_id}/jobs/{seq}", summary="One job")
def job(request: Request, run_id: str, seq: int) -> Response:
    store = _reader(request, run_id)
    try:
        found: Any = wire.record_json(store.job(f"{run_id}-{seq}"))
    except NotFound:
        found = None
    return _ok({"job": found})


@client.get("/runs/{run_id}/ended", summary="Jobs that ended since a moment, with results")
def ended(request: Request, run_id: str, since: float = 0.0, results: bool = True) -> Response:
    found = _reader(request, run_id).ended(run_id, since, results)
    return _ok({"ended": [wire.ended_json(e) for e in found]})


@client.get("/runs/{run_id}/usage", summary="What fleets spent on the run")
def usage(request: Request, run_id: str) -> Response:
    found = _reader(request, run_id).usage(run_id)
    return _ok({"usage": [wire.record_json(u) for u in found]})


@client.post("/runs/{run_id}/clear_results", summary="Forget a run's calls and results")
def clear_results(request: Request, run_id: str) -> Response:
    return _ok({"cleared": _reader(request, run_id).clear_results(run_id)})


def _job_key(body: dict[str, Any] | None) -> int | None:
    key = (body or {}).get("job")
    return None if key is None else int(key)


@client.post("/runs/{run_id}/retry", summary="Queue failed jobs again")
def retry(request: Request, run_id: str, body: Json) -> Response:
    return _ok({"queued": _reader(request, run_id).retry(run_id, _job_key(body))})


@client.post("/runs/{run_id}/cancel", summary="Cancel queued jobs, stop running ones")
def cancel(request: Request, run_id: str, body: Json) -> Response:
    done, asked = _reader(request, run_id).cancel(run_id, _job_key(body))
    return _ok({"cancelled": done, "asked": asked})


def _job_run(gate: Gate, p: Principal, key: int) -> None:
    run_id = gate.db.run_of_job(key)
    if run_id is None:
        raise NotFound(f"there is no job with key {key}")
    gate.run(p, run_id)


@client.get("/jobs/{key}/attempts", summary="A job's finished attempts")
def attempts(request: Request, key: int) -> Response:
    gate, p = _who(request)
    _job_run(gate, p, key)
    return _ok({"attempts": [wire.record_json(a) for a in gate.store().attempts(key)]})


@client.get("/events", summary="The events of a run or a job (all of them: admin only)")
def events(request: Request, run: str | None = None, job: int | None = None) -> Response:
    gate, p = _who(request)
    if job is not None:
        _job_run(gate, p, job)
    elif run is not None:
        gate.run(p, run)
    elif p.role != ADMIN:
        raise Refused("only an admin token reads every run's events",
                      "ask for the events of one run (events?run=RUN)")
    return _ok({"events": [wire.record_json(e) for e in gate.store().events(run, job)]})


@client.get("/workers", summary="Every worker: host, slots, state, heartbeats (not workers)")
def workers(request: Request) -> Response:
    """What `jobfleet workers` and `explain` show a client; a worker token sees no fleet."""
    gate, p = _who(request)
    if p.role == WORKER:
        raise Refused("a worker token cannot list the workers", "use a client or admin token")
    return _ok({"workers": [wire.record_json(w) for w in gate.store().workers()]})


# -- blobs ------------------------------------------------------------------------------------
def _blobs(gate: Gate) -> Blobs:
    assert isinstance(gate.blobs, Blobs)
    return gate.blobs


@blobs.get("", summary="Blobs under a prefix: [key, size] pairs")
def find(request: Request, prefix: str) -> Response:
    gate, p = _who(request)
    gate.prefix(p, prefix.strip("/"), write=False)
    return _ok({"blobs": _blobs(gate).find(prefix.strip("/"))})


@blobs.delete("", summary="Delete the blobs under a prefix")
def delete(request: Request, prefix: str) -> Response:
    gate, p = _who(request)
    gate.prefix(p, prefix.strip("/"), write=True)
    return _ok({"deleted": _blobs(gate).delete_prefix(prefix.strip("/"))})


@blobs.get("/{key:path}", summary="A blob's bytes (from offset, at most limit), or its size")
def read(request: Request, key: str, offset: int = 0, limit: int | None = None,
         stat: bool = False) -> Response:
    gate, p = _who(request)
    gate.blob(p, key, write=False)
    store = _blobs(gate)
    size = store.size(key)
    if stat:
        return _ok({"size": size})
    if size is None:
        raise NotFound(f"{key} is not in the blob store")
    return Response(store.read(key, offset, limit), media_type="application/octet-stream")


@blobs.put("/{key:path}", summary="Store a blob (whole: readers see the old one or this one)")
async def write(request: Request, key: str) -> Response:
    gate: Gate = request.app.state.gate
    p = await run_in_threadpool(gate.principal, bearer(request))
    await run_in_threadpool(gate.blob, p, key, write=True)
    fd, path = tempfile.mkstemp(prefix="jobfleet-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            async for piece in request.stream():
                f.write(piece)
        size = await run_in_threadpool(_blobs(gate).put_file, key, path)
    finally:
        os.unlink(path)
    return _ok({"size": size})
