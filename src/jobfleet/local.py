"""Worker processes on this machine, started and watched by `jobfleet run`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from jobfleet.config import Settings
from jobfleet.worker.loop import WorkerOptions


@dataclass
class LocalWorker:
    id: str
    proc: subprocess.Popen[bytes]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


def start_worker(settings: Settings, options: WorkerOptions) -> LocalWorker:
    """Start `python -m jobfleet.worker` in its own session (a Ctrl-C reaches only `run`)."""
    assert options.worker_id, "local workers are named by their starter"
    conf = {"store": settings.store, "blobs": settings.blobs,
            "options": dataclasses.asdict(options)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobfleet.worker", json.dumps(conf)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    return LocalWorker(options.worker_id, proc)


def stop_workers(workers: list[LocalWorker], *, now: bool = False, wait: float = 10.0) -> None:
    """Ask workers to drain (twice: release running jobs at once, with `now`), then wait."""
    for w in workers:
        w.signal(signal.SIGTERM)
    if now:  # a second signal, once the first was surely handled, releases running jobs
        time.sleep(0.1)
        for w in workers:
            w.signal(signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(wait)
        except subprocess.TimeoutExpired:
            w.signal(signal.SIGKILL)
            w.proc.wait()
