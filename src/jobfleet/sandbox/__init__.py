"""Sandboxes: how one attempt of a job is started, watched, limited and stopped."""

from jobfleet.sandbox.base import (
    SANDBOXES,
    Attempt,
    Child,
    Sandbox,
    SandboxError,
    Verdict,
    Workspaces,
    sandbox_named,
)
from jobfleet.sandbox.process import ProcessSandbox

__all__ = ["SANDBOXES", "Attempt", "Child", "ProcessSandbox", "Sandbox", "SandboxError",
           "Verdict", "Workspaces", "sandbox_named"]
