"""Watching a run: the live progress bar, replacing workers that die, and the final summary."""

from __future__ import annotations

import dataclasses
import os
import select
import time

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jobfleet.blobs import Blobs, log_key
from jobfleet.cli.app import err, out
from jobfleet.cli.fmt import counts_text, duration
from jobfleet.config import Settings
from jobfleet.local import LocalWorker, start_worker, stop_workers
from jobfleet.store import Store
from jobfleet.worker import WorkerOptions

#: how many times `run` replaces a worker that died before giving up
MAX_REPLACEMENTS = 5
#: failures listed in the summary
SHOW_FAILURES = 10
#: log lines shown per failure: up to this many from the start and from the end
EXCERPT = 3
_TICK = 0.1


def watch_run(
    db: Store,
    blobs: Blobs,
    run_id: str,
    workers: list[LocalWorker],
    settings: Settings,
    options: WorkerOptions,
) -> int:
    """Show progress until every job of the run is done; returns the exit status."""
    total = db.run(run_id).total
    started = time.monotonic()
    replaced = 0
    out.print(f"run [bold]{run_id}[/]: {total} jobs, {settings.slots} slots  "
              f"[dim](store {db.url})[/]")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("[dim]{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=out,
        refresh_per_second=8,
    )
    poller = select.poll()
    for w in workers:
        poller.register(_pidfd(w), select.POLLIN)
    last_line = started
    try:
        with progress:
            task = progress.add_task(run_id, total=total, counts="", rate="")
            while True:
                counts = db.counts(run_id)
                done = total - counts["queued"] - counts["running"]
                elapsed = time.monotonic() - started
                rate = f"{done / elapsed:.0f} jobs/s" if elapsed > 0.5 and done else ""
                progress.update(task, completed=done, counts=counts_text(counts), rate=rate)
                if done == total:
                    break
                if not out.is_terminal and time.monotonic() - last_line > 10:
                    out.print(f"{run_id}: {done}/{total} done  {counts_text(counts)}")
                    last_line = time.monotonic()
                poller.poll(_TICK * 1000)
                for w in list(workers):
                    code = w.proc.poll()
                    if code is None:
                        continue
                    workers.remove(w)
                    if db.pending(run_id) == 0:
                        continue
                    lost = db.forget_worker(w.id, f"worker {w.id} died (exit status {code})")
                    if replaced >= MAX_REPLACEMENTS:
                        err.print(f"[red]error:[/] workers keep dying (last exit status {code});"
                                  f" run {run_id} stopped with jobs left")
                        return 1
                    replaced += 1
                    err.print(f"[yellow]worker {w.id} died (exit status {code}); {lost} of its"
                              f" jobs go back to the queue; starting another[/]")
                    opts = dataclasses.replace(options, worker_id=f"{options.worker_id}.{replaced}")
                    nw = start_worker(settings, opts)
                    workers.append(nw)
                    poller.register(_pidfd(nw), select.POLLIN)
    except KeyboardInterrupt:
        err.print("\n[yellow]stopping: running jobs go back to the queue[/]")
        stop_workers(workers, now=True)
        left = db.pending(run_id) or 0
        err.print(f"run {run_id} stopped with {left} jobs left. Resume with "
                  f"`jobfleet worker --run {run_id}`, or `jobfleet cancel {run_id}`.")
        return 130
    stop_workers(workers, wait=10.0)
    return summary(db, blobs, run_id, time.monotonic() - started)


def _pidfd(w: LocalWorker) -> int:
    return os.pidfd_open(w.proc.pid)


def summary(db: Store, blobs: Blobs, run_id: str, elapsed: float | None = None) -> int:
    """Print the counts and the failed jobs with log excerpts; 0 when nothing failed."""
    counts = db.counts(run_id)
    took = f" in {duration(elapsed)}" if elapsed is not None else ""
    out.print(f"run [bold]{run_id}[/] finished{took}: {counts_text(counts)}")
    bad = counts["failed"] + counts["cancelled"]
    if counts["failed"]:
        failed = db.jobs(run_id, "failed", limit=SHOW_FAILURES)
        out.print(f"\n[red]failed jobs ({counts['failed']}):[/]")
        for job in failed:
            label = f" ({job.name})" if job.name else ""
            out.print(f"  [bold]{job.id}[/]{label}: {job.reason or 'failed'}"
                      f" after {job.attempts} attempt{'s' if job.attempts != 1 else ''}")
            for line in excerpt(blobs, log_key(job.run_id, job.seq, job.attempts)):
                out.print(f"    [dim]|[/] {escape(line)}")
        if counts["failed"] > len(failed):
            out.print(f"  ... and {counts['failed'] - len(failed)} more:"
                      f" jobfleet jobs {run_id} --state failed")
        out.print(f"\nrerun the failed ones: jobfleet retry {run_id} && "
                  f"jobfleet worker --run {run_id} --idle-exit 2")
        out.print(f"a job's whole log:     jobfleet logs {failed[0].id}")
    return 1 if bad else 0


def excerpt(blobs: Blobs, key: str) -> list[str]:
    """The first and last lines of a log, with a marker for what lies between."""
    head = blobs.read(key, 0, 64 * 1024)
    lines = head.decode("utf-8", "replace").splitlines()
    if len(head) < 64 * 1024:
        if len(lines) <= 2 * EXCERPT + 1:
            return lines
        return [*lines[:EXCERPT], f"... ({len(lines) - 2 * EXCERPT} lines) ...",
                *lines[-EXCERPT:]]
    return [*lines[:EXCERPT], "...", *blobs.tail(key, EXCERPT)]
