"""Small formatting helpers shared by the commands: times, durations, states, JSON."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from jobfleet.store import STATES, Job, Run

STATE_STYLE = {
    "queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red",
    "cancelled": "magenta", "skipped": "blue",
}


def escape(text: str) -> str:
    """`text` made safe to print in rich markup (rich is imported on first use)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return duration(max(0.0, time.time() - ts)) + " ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def size(n: int | None) -> str:
    """Bytes for people: `512B`, `29.6MiB`, `23.5GiB`."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n}B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"


def counts_text(counts: dict[str, int]) -> str:
    return "  ".join(f"[{STATE_STYLE[s]}]{counts[s]} {s}[/]" for s in STATES if counts.get(s))


def run_state(run: Run, counts: dict[str, int]) -> str:
    """One word for a run: active, finished or cancelled; or `stopped: budget` (a cap)."""
    if counts["queued"] or counts["running"]:
        return f"stopped: {run.stopped}" if run.stopped else "active"
    return "cancelled" if run.cancelled else "finished"


def run_json(run: Run, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "run": run.id, "name": run.name, "source": run.source, "workdir": run.workdir,
        "created_at": iso(run.created_at), "total": run.total, "state": run_state(run, counts),
        "counts": counts,
    }


def job_json(job: Job) -> dict[str, Any]:
    return {
        "job": job.id, "run": job.run_id, "seq": job.seq, "name": job.name, "state": job.state,
        "attempts": job.attempts, "max_attempts": job.max_attempts, "exit_code": job.exit_code,
        "signal": job.signal, "reason": job.reason, "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at), "worker": job.worker_id, "peak_rss": job.peak_rss,
        "stalled_since": iso(job.stalled_since), "command": job.spec.command,
    }


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2)
