"""The `container` sandbox: each attempt in a throwaway docker or podman container.

The job's `image` (default `debian:stable-slim`) runs its command with the workspace and the
workdir mounted at the same paths, the job's CPU and memory limits, and no network unless the
job asks for one and the worker allows it. The engine is whichever of podman and docker
answers `info` when the worker starts; where neither does, the worker refuses to start and
says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from jobfleet.sandbox.base import Attempt, Child, Sandbox, SandboxError, Verdict
from jobfleet.sandbox.process import job_argv, start

DEFAULT_IMAGE = "debian:stable-slim"


def find_engine() -> tuple[str | None, str]:
    """(path of a usable engine, or None; why none is usable)."""
    problems = []
    for name in ("podman", "docker"):
        path = shutil.which(name)
        if path is None:
            problems.append(f"{name} is not installed")
            continue
        try:
            p = subprocess.run([path, "info"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"{name} info failed: {e}")
            continue
        if p.returncode == 0:
            return path, ""
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["no answer"]
        problems.append(f"{name} is installed but not usable: {last[0]}")
    return None, "; ".join(problems)


class ContainerSandbox(Sandbox):
    """Start attempts with `ENGINE run --rm`."""

    name = "container"
    cuts_network = True

    def __init__(self, engine: str | None = None) -> None:
        self.engine = engine
        self._why = ""

    def check(self) -> None:
        if self.engine is None:
            self.engine, self._why = find_engine()
        if self.engine is None:
            raise SandboxError(
                f"the container sandbox has no container engine to use: {self._why}",
                hint="start the docker daemon or install podman, or choose --sandbox process "
                     "or --sandbox bwrap")

    def argv(self, attempt: Attempt) -> list[bytes]:
        assert self.engine is not None
        args = [self.engine, "run", "--rm", "--init", "--name", f"jobfleet-{attempt.name}",
                "--workdir", attempt.cwd]
        if not attempt.network:
            args += ["--network", "none"]
        if attempt.memory:
            args += ["--memory", str(attempt.memory)]
        if attempt.cpus:
            args += ["--cpus", f"{attempt.cpus:g}"]
        for folder in (*attempt.writable, attempt.workspace):
            args += ["--volume", f"{folder}:{folder}"]
        for entry in attempt.env:
            name = entry.split(b"=", 1)[0].decode()
            if name != "PATH":  # the image's own PATH finds its programs
                args += ["--env", name]  # the value comes from the engine's own environment
        args.append(attempt.image or DEFAULT_IMAGE)
        return [os.fsencode(a) for a in args] + job_argv(attempt.command)

    def run(self, attempt: Attempt) -> Child:
        self.check()
        try:
            return start(self.argv(attempt), attempt.env, attempt.workspace)
        except OSError as e:
            raise SandboxError(f"could not start {self.engine}: {e}") from e

    def teardown(self, attempt: Attempt) -> Verdict:
        assert self.engine is not None  # a timeout killed the client: remove the container
        subprocess.run([self.engine, "rm", "--force", f"jobfleet-{attempt.name}"],
                       capture_output=True, timeout=60, check=False)
        return Verdict()
