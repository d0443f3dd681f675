"""Sandboxes: how one attempt of a job is started, watched and stopped."""

from jobfleet.sandbox.process import Child, ProcessSandbox

__all__ = ["Child", "ProcessSandbox"]
