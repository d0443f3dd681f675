"""Read-only commands: runs, status, jobs, logs, events, workers."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from jobfleet.blobs import log_key
from jobfleet.cli.app import BlobsOpt, JsonOpt, StoreOpt, app, connect, connect_store, err, out, settings
from jobfleet.cli.fmt import (
    STATE_STYLE,
    ago,
    counts_text,
    dumps,
    duration,
    iso,
    job_json,
    run_json,
    run_state,
    size,
)
from jobfleet.errors import NotFound
from jobfleet.store import STALLED, STATES, WorkerInfo, state_filter

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id or unique prefix.")]


@app.command()
def runs(
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 20,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    db = connect_store(settings(store))
    rows = [(r, db.counts(r.id)) for r in db.runs(limit)]
    if json:
        out.print(dumps([run_json(r, c) for r, c in rows]))
        return
    if not rows:
        out.print(f"no runs in {db.url} yet; start one with `jobfleet run FILE`")
        return
    table = Table(box=None)
    for col in ("run", "created", "jobs", "state", "counts", "source"):
        table.add_column(col)
    for r, c in rows:
        table.add_row(r.id, ago(r.created_at), str(r.total), run_state(r, c), counts_text(c),
                      r.name or r.source or "")
    out.print(table)


@app.command()
def status(
    run: Annotated[str, typer.Argument(metavar="[RUN]", help="Run id or prefix (default: latest).")]
    = "latest",
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Counts of a run's jobs by state."""
    db = connect_store(settings(store))
    r = db.run(run)
    counts = db.counts(r.id)
    if json:
        usage = db.usage(r.id)
        out.print(dumps({**run_json(r, counts), "cost": round(sum(u.cost for u in usage), 6),
                         "usage": [{"instance_type": u.instance_type,
                                    "worker_seconds": round(u.worker_seconds, 3),
                                    "cost": round(u.cost, 6)} for u in usage]}))
        return
    done = r.total - counts["queued"] - counts["running"]
    out.print(f"run [bold]{r.id}[/] ({run_state(r, counts)}), {r.name or r.source or ''}")
    out.print(f"  created {ago(r.created_at)}, {done}/{r.total} done")
    stalled = len(db.jobs(r.id, STALLED)) if counts["running"] else 0
    for state in STATES:
        note = f"  [yellow]({stalled} stalled)[/]" if state == "running" and stalled else ""
        out.print(f"  [{STATE_STYLE[state]}]{state:<10}[/] {counts[state]}{note}")
    usage = db.usage(r.id)
    if usage:
        from jobfleet.cli.fleet import cost_text

        out.print(f"  cost so far: {cost_text(usage)}")


@app.command()
def jobs(
    run: RunArg,
    state: Annotated[str | None, typer.Option("--state", help="Only jobs in this state.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many.")] = None,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """List a run's jobs."""
    state = state_filter(state)
    db = connect_store(settings(store))
    found = db.jobs(db.run(run).id, state, limit)
    if json:
        out.print(dumps([job_json(j) for j in found]))
        return
    if not found:
        out.print(f"no {state + ' ' if state else ''}jobs in run {run}")
        return
    table = Table(box=None)
    for col in ("job", "name", "state", "tries", "exit", "took", "peak mem", "reason"):
        table.add_column(col)
    for j in found:
        took = (j.finished_at - j.started_at) if j.finished_at and j.started_at else None
        exit_text = str(j.exit_code) if j.exit_code is not None else (
            f"sig {j.signal}" if j.signal else "")
        shown = f"[{STATE_STYLE[j.state]}]{j.state}[/]" + (
            f" [yellow](stalled {duration(time.time() - j.stalled_since)})[/]"
            if j.stalled_since else "")
        table.add_row(j.id, j.name or "", shown,
                      str(j.attempts), exit_text, duration(took) if took is not None else "",
                      size(j.peak_rss) if j.peak_rss else "", j.reason or "")
    out.print(table)


@app.command()
def logs(
    job: Annotated[str, typer.Argument(metavar="JOB", help="Job id, RUN-N.")],
    attempt: Annotated[int | None, typer.Option("--attempt", help="Which attempt (latest).")]
    = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until it ends.")]
    = False,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Print the log of a job's attempt."""
    db, blob_store = connect(settings(store, blobs))
    j = db.job(job)
    if j.attempts == 0:
        raise NotFound(f"job {j.id} has not started yet ({j.state})",
                       hint=f"`jobfleet status {j.run_id}` shows the run's progress")
    n = attempt or j.attempts
    if not 1 <= n <= j.attempts:
        raise NotFound(f"job {j.id} has no attempt {n}", hint=f"it has 1 to {j.attempts}")
    key = log_key(j.run_id, j.seq, n)
    offset = 0
    while True:
        data = blob_store.read(key, offset)
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            offset += len(data)
        if not follow:
            if not offset:
                err.print(f"[dim](attempt {n} of {j.id} has printed nothing)[/]")
            return
        attempts = db.attempts(j.key)
        if len(attempts) >= n and attempts[n - 1].state != "running":
            data = blob_store.read(key, offset)
            sys.stdout.buffer.write(data)
            return
        time.sleep(0.2)


@app.command()
def events(
    ref: Annotated[str, typer.Argument(metavar="RUN|JOB", help="A run id, or a job id RUN-N.")],
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """The timeline of a run or a job: leases, results, retries, cancels."""
    db = connect_store(settings(store))
    if "-" in ref:
        j = db.job(ref)
        found, names = db.events(job_key=j.key), {j.key: j.id}
    else:
        r = db.run(ref)
        found = db.events(run_id=r.id)
        names = {j.key: j.id for j in db.jobs(r.id)} if found else {}
    if json:
        out.print(dumps([{"at": iso(e.at), "kind": e.kind, "job": names.get(e.job_key or -1),
                          "worker": e.worker_id, **e.detail} for e in found]))
        return
    for e in found:
        what = names.get(e.job_key or -1, e.run_id or "")
        detail = " ".join(f"{k}={iso(v) if k.endswith('_at') else v}"  # type: ignore[arg-type]
                          for k, v in e.detail.items())
        worker = f" on {e.worker_id}" if e.worker_id else ""
        out.print(f"{iso(e.at)}  {what:<14} {e.kind}{worker}  [dim]{detail}[/]")


@app.command()
def workers(store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Workers that have used this store, and whether they are alive."""
    db = connect_store(settings(store))
    now = time.time()
    rows = db.workers()

    def alive(w: WorkerInfo) -> str:
        """`running`/`draining` only while heartbeats arrive; `silent` once they stopped."""
        if w.state in ("stopped", "lost"):
            return w.state
        return w.state if now - w.heartbeat_at < w.lease_seconds else "silent"

    if json:
        out.print(dumps([{
            "worker": w.id, "host": w.host, "pid": w.pid, "run": w.run_id, "state": alive(w),
            "slots": w.slots, "cpus": w.cpus, "memory": w.memory, "gpus": w.gpus,
            "jobs_done": w.jobs_done, "started_at": iso(w.started_at),
            "heartbeat_at": iso(w.heartbeat_at)} for w in rows]))
        return
    table = Table(box=None)
    for col in ("worker", "host", "pid", "state", "slots", "done", "run", "last heartbeat"):
        table.add_column(col)
    for w in rows:
        table.add_row(w.id, w.host, str(w.pid), alive(w), str(w.slots), str(w.jobs_done),
                      w.run_id or "any", ago(w.heartbeat_at))
    out.print(table)

