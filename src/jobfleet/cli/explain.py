"""`jobfleet explain JOB`: why a job is where it is, in words a user can act on.

Everything is read from the store (and the job's log): what a queued job waits for, how a
running one is doing, why a failed one failed and what to try next. `explain()` is the answer
as data, for the command and the dashboard alike.
"""

from __future__ import annotations

import signal as signals
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer

from jobfleet.blobs import Blobs, log_key
from jobfleet.cli.app import BlobsOpt, JsonOpt, StoreOpt, app, connect, out, settings
from jobfleet.cli.fmt import STATE_STYLE, dumps, duration, escape, size
from jobfleet.store import Job, Store, WorkerInfo
from jobfleet.store.policy import SANDBOX_ERROR, STALLED

#: log lines shown for a failed job
LOG_LINES = 10

#: what an exit status usually means, for the ones with a convention
_EXIT_MEANINGS = {
    1: "a general error: the program reported a failure",
    2: "usually a usage error: a wrong option or argument",
    126: "the command was found but could not be run (not executable, or a folder)",
    127: "the command was not found: a typo, or it is not installed or not on PATH",
    130: "interrupted (SIGINT, as from Ctrl-C)",
    137: "killed with SIGKILL: often the kernel's out-of-memory killer",
    139: "a segmentation fault (SIGSEGV): the program crashed",
    143: "terminated with SIGTERM",
}


@dataclass
class Explanation:
    """A job's state, why it is in it, the facts behind that, and what to try."""

    job: str
    state: str
    why: str
    facts: list[str] = field(default_factory=list)
    fix: str | None = None
    log: list[str] = field(default_factory=list)  # the last lines of the latest attempt's log


def explain(db: Store, blobs: Blobs, job: Job, now: float | None = None) -> Explanation:
    ex = _explain(db, blobs, job, time.time() if now is None else now)
    if job.attempts > 1 or job.state == "queued":
        ex.facts += _handed_back(db, job)
    return ex


def _handed_back(db: Store, job: Job) -> list[str]:
    """Attempts a worker handed back (drained, or interrupted by a spot reclaim), with why."""
    return [f"attempt {a.number} was handed back: {a.reason} (it did not count against"
            f" max_attempts)" for a in db.attempts(job.key) if a.state == "released"]


def _explain(db: Store, blobs: Blobs, job: Job, now: float) -> Explanation:
    if job.state == "queued":
        return _queued(db, job, now)
    if job.state == "running":
        return _running(db, job, now)
    if job.state == "failed":
        return _failed(db, blobs, job)
    took = _took(job)
    if job.state == "succeeded":
        return Explanation(job.id, job.state, f"it succeeded after {_attempts(job.attempts)}{took}.")
    if job.state == "skipped":
        return Explanation(job.id, job.state, f"it was skipped: {job.reason or 'already done'}.")
    return Explanation(job.id, job.state, f"it was {job.reason or 'cancelled'}.",
                       fix=f"`jobfleet retry {job.id}` queues it again")


def _queued(db: Store, job: Job, now: float) -> Explanation:
    spec = job.spec
    if job.not_before > now:
        last = db.attempts(job.key)[-1:] or None
        cause = f" (attempt {job.attempts} {_attempt_reason(last[0].reason)})" if last else ""
        return Explanation(
            job.id, job.state,
            f"it is waiting out a retry backoff until {_clock(job.not_before)}, "
            f"{job.not_before - now:.0f}s from now{cause}.",
            [f"attempts used: {job.attempts} of {job.max_attempts}"])
    workers = [w for w in db.workers() if _alive(w, now)]
    serving = [w for w in workers if w.run_id in (None, job.run_id)]
    if not serving:
        elsewhere = (f"; {len(workers)} alive worker(s) serve other runs only" if workers else "")
        return Explanation(
            job.id, job.state, f"no worker is alive to run it{elsewhere}.",
            fix=f"start one: `jobfleet worker --run {job.run_id}` (or `jobfleet worker` for "
                "every run)")
    big_enough = [w for w in serving
                  if w.cpus >= spec.cpus and w.memory >= spec.memory and w.gpus >= spec.gpus]
    if not big_enough:
        largest = max(serving, key=lambda w: (w.cpus, w.memory, w.gpus))
        return Explanation(
            job.id, job.state,
            f"no alive worker is large enough: it needs {_needs(spec.cpus, spec.memory, spec.gpus)}"
            f"; the largest, {largest.id} on {largest.host}, offers "
            f"{_needs(largest.cpus, largest.memory, largest.gpus)}.",
            fix="lower what the job asks for (`jobfleet retry` after editing the run is not "
                "enough: submit it again), or start a bigger worker: `jobfleet worker --cpus N "
                "--memory SIZE --gpus N`")
    if all(w.state == "draining" for w in big_enough):
        return Explanation(job.id, job.state,
                           "every worker that could run it is draining (stopping).",
                           fix=f"start a new one: `jobfleet worker --run {job.run_id}`")
    ahead = sum(1 for j in db.jobs(job.run_id, state="queued") if j.key < job.key)
    slots = sum(w.slots for w in big_enough)
    return Explanation(
        job.id, job.state,
        f"it is waiting for a free slot: {ahead} job(s) of its run are ahead of it in line.",
        [f"{len(big_enough)} alive worker(s) that fit it, {slots} slot(s) in all, all busy"],
        fix="start more workers to go faster: `jobfleet worker`")


def _running(db: Store, job: Job, now: float) -> Explanation:
    worker = next((w for w in db.workers() if w.id == job.worker_id), None)
    since = f" for {duration(now - job.started_at)}" if job.started_at else ""
    where = f"{job.worker_id} on {worker.host}" if worker else str(job.worker_id)
    ex = Explanation(job.id, job.state,
                     f"on worker {where}{since}, attempt {job.attempts} of {job.max_attempts}.")
    if worker is not None:
        silent = now - worker.heartbeat_at
        ex.facts.append(f"last heartbeat from its worker: {duration(silent)} ago")
        if silent > worker.lease_seconds:
            ex.why += " Its worker has gone silent: the lease expires and the job is retried."
            ex.fix = "check the worker's host; `jobfleet workers` lists them"
    if job.stalled_since is not None:
        quiet = duration(now - job.stalled_since)
        ex.why += (f" It looks stalled: no output and no CPU use for {quiet} (its stall_after"
                   f" is {duration(job.spec.stall_after or 0)}).")
        ex.fix = (f"see what it last printed with `jobfleet logs {job.id}`; if it is hung,"
                  f" `jobfleet cancel {job.id}`, or give such jobs"
                  " `on_stall = retry` to have them stopped and retried")
    timeout = job.spec.timeout
    if timeout and job.started_at:
        ex.facts.append(f"timeout: {timeout:g}s, {max(0.0, timeout - (now - job.started_at)):.0f}s"
                        " left")
    return ex


def _failed(db: Store, blobs: Blobs, job: Job) -> Explanation:
    reason = job.reason or ""
    why, fix = _failure(job, reason)
    ex = Explanation(job.id, job.state, why, fix=fix)
    ex.facts.append(f"attempts used: {job.attempts} of {job.max_attempts}")
    if job.attempts:
        data = blobs.read(log_key(job.run_id, job.seq, job.attempts))
        ex.log = data.decode(errors="replace").splitlines()[-LOG_LINES:]
    if not ex.log and job.attempts:
        ex.facts.append("its last attempt printed nothing")
    return ex


def _failure(job: Job, reason: str) -> tuple[str, str]:
    """(why in words, what to try) for a failed job."""
    retry = f"`jobfleet retry {job.id}` runs it again"
    if reason.startswith("timed out"):
        return (f"it {reason}: it ran longer than its timeout and was stopped.",
                f"raise its `timeout`, or find why it ran long; then {retry}")
    if reason.startswith("out of memory"):
        return (f"it ran out of memory ({reason}).",
                f"raise its `memory`, or make it use less; then {retry}")
    if "lost" in reason:
        return (f"its worker was lost ({reason}): the machine died, was stopped, or lost the "
                "store, and the job had no attempts left.",
                f"{retry}; raise `max_attempts` so a lost worker costs a retry, not the job")
    if reason.startswith(STALLED):
        return (f"it {reason}, so it was stopped (its on_stall is retry) and had no attempts"
                " left.", f"look at where its log ends for what it waited on; then {retry}")
    if reason.startswith(SANDBOX_ERROR):
        return (f"the sandbox itself failed ({reason}), not the job.",
                f"`jobfleet doctor` checks the setup; then {retry}")
    if reason.startswith("declared output missing"):
        return (f"it exited 0 but a {reason}.",
                f"check its `outputs` patterns against what it writes; then {retry}")
    if job.signal is not None:
        name = _signal_name(job.signal)
        hint = " (often the out-of-memory killer, or kill -9)" if job.signal == 9 else ""
        return (f"it was killed by signal {job.signal} ({name}){hint}.",
                f"look at its log and at who sends {name}; then {retry}")
    if job.exit_code is not None and job.exit_code != 0:
        meaning = _EXIT_MEANINGS.get(job.exit_code)
        if meaning is None and job.exit_code > 128:
            meaning = f"probably killed by signal {job.exit_code - 128} " \
                      f"({_signal_name(job.exit_code - 128)}) in a child process"
        text = f"it exited with code {job.exit_code}" + (f": {meaning}" if meaning else "")
        return f"{text}.", f"fix the cause, then {retry}"
    if reason:  # a Python call's exception, a missing workdir, a start failure
        return f"it failed: {reason}.", f"fix the cause, then {retry}"
    return "it failed without a recorded reason.", retry


def _alive(w: WorkerInfo, now: float) -> bool:
    return w.state in ("running", "draining") and now - w.heartbeat_at < w.lease_seconds


def _needs(cpus: float, memory: int, gpus: int) -> str:
    return f"{cpus:g} cpus, {size(memory)} of memory and {gpus} gpus"


def _attempt_reason(reason: str | None) -> str:
    return f"failed: {reason}" if reason else "failed"


def _attempts(n: int) -> str:
    return f"{n} attempt" + ("s" if n != 1 else "")


def _took(job: Job) -> str:
    if job.started_at and job.finished_at:
        return f", its last one taking {duration(job.finished_at - job.started_at)}"
    return ""


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


@app.command("explain")
def explain_command(
    job: Annotated[str, typer.Argument(metavar="JOB", help="Job id, RUN-N.")],
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
    json: JsonOpt = False,
) -> None:
    """Why a job is queued, running or failed, and what to do about it."""
    db, blob_store = connect(settings(store, blobs))
    ex = explain(db, blob_store, db.job(job))
    if json:
        out.print(dumps(asdict(ex)))
        return
    out.print(f"{ex.job} is [{STATE_STYLE[ex.state]}]{ex.state}[/]: {escape(ex.why)}")
    for fact in ex.facts:
        out.print(f"  {escape(fact)}")
    if ex.log:
        out.print("[dim]last lines of its log:[/]")
        for line in ex.log:
            out.print(f"  [dim]|[/] {escape(line)}")
    if ex.fix:
        out.print(f"[bold]try:[/] {escape(ex.fix)}")
