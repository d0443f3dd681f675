"""How the store's records travel between the gateway and its workers and clients: JSON, with
bytes (payloads, results, log chunks) in base64 and job specs as their own JSON text."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from jobfleet.spec.model import JobSpec
from jobfleet.store import (
    Attempt,
    Beat,
    Capacity,
    Ended,
    Event,
    Job,
    Lease,
    NewRun,
    Outcome,
    Run,
    WorkerInfo,
)

#: the header that marks a request sent again after its answer was lost
RETRY_HEADER = "X-Jobfleet-Retry"


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def capacity_json(c: Capacity | None) -> list[Any] | None:
    return None if c is None else [c.slots, c.cpus, c.memory, c.gpus]


def capacity_of(v: list[Any] | None) -> Capacity | None:
    return None if v is None else Capacity(int(v[0]), float(v[1]), int(v[2]), int(v[3]))


def lease_json(x: Lease) -> dict[str, Any]:
    return {"key": x.key, "run": x.run_id, "seq": x.seq, "attempt": x.attempt, "token": x.token,
            "expires": x.expires, "spec": x.spec.to_json(), "workdir": x.run_workdir,
            "payload": b64(x.payload)}


def lease_of(d: dict[str, Any]) -> Lease:
    return Lease(d["key"], d["run"], d["seq"], d["attempt"], d["token"], d["expires"],
                 JobSpec.from_json(d["spec"]), d["workdir"], unb64(d["payload"]))


def outcome_json(o: Outcome) -> dict[str, Any]:
    d = {f.name: getattr(o, f.name) for f in dataclasses.fields(Outcome)}
    d["result"] = b64(o.result)
    return d


def outcome_of(d: dict[str, Any]) -> Outcome:
    return Outcome(**{**d, "result": unb64(d.get("result"))})


def beat_json(b: Beat) -> dict[str, Any]:
    return {"lost": sorted(b.lost), "cancel": sorted(b.cancel)}


def beat_of(d: dict[str, Any]) -> Beat:
    return Beat(frozenset(d["lost"]), frozenset(d["cancel"]))


def record_json(record: Any) -> dict[str, Any]:
    """A plain record (Run, Job, Attempt, Event, WorkerInfo, NewRun) as JSON."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _known(cls: Any, d: dict[str, Any]) -> dict[str, Any]:
    """`d` without fields `cls` does not have (a server newer than this client)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def run_of(d: dict[str, Any]) -> Run:
    return Run(**_known(Run, d))


def job_of(d: dict[str, Any]) -> Job:
    return Job(**_known(Job, d))


def attempt_of(d: dict[str, Any]) -> Attempt:
    return Attempt(**_known(Attempt, d))


def event_of(d: dict[str, Any]) -> Event:
    return Event(**_known(Event, d))


def worker_of(d: dict[str, Any]) -> WorkerInfo:
    return WorkerInfo(**_known(WorkerInfo, d))


def new_run_of(d: dict[str, Any]) -> NewRun:
    return NewRun(**_known(NewRun, d))


def ended_json(e: Ended) -> dict[str, Any]:
    return {"seq": e.seq, "state": e.state, "reason": e.reason, "result": b64(e.result),
            "finished_at": e.finished_at}


def ended_of(d: dict[str, Any]) -> Ended:
    return Ended(d["seq"], d["state"], d["reason"], unb64(d["result"]), d["finished_at"])
