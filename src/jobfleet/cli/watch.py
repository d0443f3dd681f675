"""Watching a run: the live progress bar and the final summary with failures and their logs."""

from __future__ import annotations

import threading
import time

from jobfleet.blobs import Blobs, log_key
from jobfleet.cli.app import out
from jobfleet.cli.fmt import counts_text, duration, escape
from jobfleet.store import Store, open_store

#: failures listed in the summary
SHOW_FAILURES = 10
#: log lines shown per failure: up to this many from the start and from the end
EXCERPT = 3
#: seconds between looks at the store
_TICK = 0.1
#: with no terminal (CI logs), one progress line every this many seconds
_PLAIN_EVERY = 10.0


class ProgressView:
    """A progress bar fed from the store by a thread of its own, so it shows every worker."""

    def __init__(self, store_url: str, run_id: str, total: int, header: str = "") -> None:
        self.store_url, self.run_id, self.total = store_url, run_id, total
        self.header = header  # printed first, by the thread (which imports rich meanwhile)
        self.started = time.monotonic()
        self.note = ""  # shown after the counts (the fleet's size, say)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._show, name="progress", daemon=True)

    def __enter__(self) -> ProgressView:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _show(self) -> None:
        if self.header:
            out.print(self.header)
        # with no terminal (a CI log): a plain line now and then; the summary says the rest
        if not out.is_terminal and self._stop.wait(_PLAIN_EVERY):
            return
        with open_store(self.store_url) as db:
            if out.is_terminal:
                self._bar(db)
            else:
                self._lines(db)

    def _done(self, db: Store) -> tuple[int, dict[str, int]]:
        counts = db.counts(self.run_id)
        return self.total - counts["queued"] - counts["running"], counts

    def _bar(self, db: Store) -> None:
        # imported here, on this thread, while the worker is already starting jobs
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("[dim]{task.fields[rate]}"),
            TextColumn("{task.fields[note]}"),
            TimeRemainingColumn(),
            console=out.console,
            refresh_per_second=8,
        )
        with progress:
            task = progress.add_task(self.run_id, total=self.total, counts="", rate="", note="")
            while True:
                stopping = self._stop.is_set()
                done, counts = self._done(db)
                elapsed = time.monotonic() - self.started
                rate = f"{done / elapsed:.0f} jobs/s" if elapsed > 0.5 and done else ""
                progress.update(task, completed=done, counts=counts_text(counts), rate=rate,
                                note=self.note)
                if stopping:
                    return
                self._stop.wait(_TICK)

    def _lines(self, db: Store) -> None:
        while True:
            done, counts = self._done(db)
            note = f"  {self.note}" if self.note else ""
            out.print(f"{self.run_id}: {done}/{self.total} done  {counts_text(counts)}{note}")
            if self._stop.wait(_PLAIN_EVERY):
                return


def summary(db: Store, blobs: Blobs, run_id: str, elapsed: float | None = None) -> int:
    """Print the counts and the failed jobs with log excerpts; 0 when nothing failed."""
    counts = db.counts(run_id)
    took = f" in {duration(elapsed)}" if elapsed is not None else ""
    left = counts["queued"] + counts["running"]
    verb = "finished" if not left else "stopped"
    rest = f" with {left} jobs left" if left else ""
    out.print(f"run [bold]{run_id}[/] {verb}{took}{rest}: {counts_text(counts)}")
    if counts["failed"]:
        failed = db.jobs(run_id, "failed", limit=SHOW_FAILURES)
        out.print(f"\n[red]failed jobs ({counts['failed']}):[/]")
        for job in failed:
            label = f" ({escape(job.name)})" if job.name else ""
            out.print(f"  [bold]{job.id}[/]{label}: {escape(job.reason or 'failed')}"
                      f" after {job.attempts} attempt{'s' if job.attempts != 1 else ''}")
            for line in excerpt(blobs, log_key(job.run_id, job.seq, job.attempts)):
                out.print(f"    [dim]|[/] {escape(line)}")
        if counts["failed"] > len(failed):
            out.print(f"  ... and {counts['failed'] - len(failed)} more:"
                      f" jobfleet jobs {run_id} --state failed")
        out.print(f"\nrerun the failed ones: jobfleet retry {run_id} && "
                  f"jobfleet worker --run {run_id} --idle-exit 2")
        out.print(f"a job's whole log:     jobfleet logs {failed[0].id}")
    return 1 if counts["failed"] or counts["cancelled"] or left else 0


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
