"""The worker: pulls jobs from the store and runs them in a sandbox."""

from jobfleet.worker.loop import Worker, WorkerOptions, capacity

__all__ = ["Worker", "WorkerOptions", "capacity"]
