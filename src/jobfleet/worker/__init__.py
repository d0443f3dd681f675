"""The worker: pulls jobs from the store and runs them in a sandbox."""

from jobfleet.worker.loop import Worker, WorkerOptions

__all__ = ["Worker", "WorkerOptions"]
