"""The `bwrap` sandbox: each attempt in bubblewrap's namespaces, seeing little of the host.

What a job sees: the host's system folders read-only (/usr, /bin, /lib*, /sbin, /etc, /opt,
and the Python environment the worker runs in), with credential files in /etc hidden; its
workspace and its workdir writable; a private /tmp, /proc and /dev; no network unless it
asks for one (`network: true`) and the worker allows it (`--allow-network`). The host's home
folders, /run, /var (the store's and docker's sockets) and /root are not there at all.

Limits work as in the `process` sandbox: the trampoline that enters the control group runs
outside bubblewrap, so bubblewrap and all it starts are inside the group. Killing the
process group (a timeout) kills bubblewrap's pid namespace and so every process in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from jobfleet.sandbox.base import Attempt, Child, SandboxError
from jobfleet.sandbox.cgroup import Cgroups
from jobfleet.sandbox.process import ProcessSandbox, job_argv, start, trampoline

#: host folders shown read-only (those that exist; symlinks are recreated as symlinks)
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
#: files and folders under /etc that hold credentials: hidden behind empty ones
HIDDEN_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
                "/etc/sudoers", "/etc/security/opasswd")
HIDDEN_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/sudoers.d", "/etc/jobfleet",
               "/etc/docker", "/etc/containers", "/etc/postgresql", "/etc/credstore",
               "/etc/credstore.encrypted")
#: where the host keeps home folders; a workdir or environment under them is shown alone
HOMES = ("/root", "/home")


def _under(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == f or path.startswith(f + "/") for f in folders)


class BwrapSandbox(ProcessSandbox):
    """Start attempts under bubblewrap (`apt-get install bubblewrap`)."""

    name = "bwrap"
    cuts_network = True

    def __init__(self, cgroups: Cgroups | None = None, bwrap: str | None = None) -> None:
        super().__init__(cgroups)
        self.bwrap = bwrap or shutil.which("bwrap") or "bwrap"
        self._fixed = self._fixed_args()

    def check(self) -> None:
        if shutil.which(self.bwrap) is None:
            raise SandboxError(
                "the bwrap sandbox needs bubblewrap, which is not installed on this machine",
                hint="install it (Debian/Ubuntu: apt-get install bubblewrap), or choose "
                     "--sandbox process")
        probe = subprocess.run([self.bwrap, *self._fixed, "--", "true"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            raise SandboxError(
                f"bubblewrap cannot start a sandbox on this machine: {probe.stderr.strip()}",
                hint="it needs user namespaces (sysctl kernel.unprivileged_userns_clone=1) "
                     "or root; or choose --sandbox process")

    def _fixed_args(self) -> list[str]:
        """The arguments every attempt shares: the read-only system, hidden credentials."""
        args = ["--die-with-parent", "--unshare-all", "--cap-drop", "ALL",
                "--hostname", "jobfleet"]
        for folder in SYSTEM:
            if os.path.islink(folder):
                args += ["--symlink", os.readlink(folder), folder]
            elif os.path.isdir(folder):
                args += ["--ro-bind", folder, folder]
        for f in HIDDEN_FILES:
            if os.path.isfile(f):
                args += ["--ro-bind", "/dev/null", f]
        for d in HIDDEN_DIRS:
            if os.path.isdir(d):
                args += ["--tmpfs", d, "--remount-ro", d]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        # the Python the worker runs (a virtualenv, or a Python outside /usr), bound after the
        # private /tmp so that one installed under /tmp stays visible too
        for prefix in sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(
                os.path.realpath(sys.executable)))}):
            if prefix and not _under(prefix, SYSTEM) and os.path.isdir(prefix):
                args += ["--ro-bind", prefix, prefix]
        return args

    def argv(self, attempt: Attempt) -> list[bytes]:
        """The bwrap command line that runs `attempt`."""
        args = [self.bwrap, *self._fixed]
        if attempt.network:  # --unshare-all cut it off
            args.append("--share-net")
            if os.path.exists("/etc/resolv.conf"):
                args += ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
        for folder in (*attempt.writable, attempt.workspace):
            if os.path.isdir(folder):
                args += ["--bind", folder, folder]
        args += ["--chdir", attempt.cwd, "--"]
        return [os.fsencode(a) for a in args] + job_argv(attempt.command)

    def run(self, attempt: Attempt) -> Child:
        if not os.path.isdir(attempt.cwd):
            raise FileNotFoundError(2, "No such file or directory", attempt.cwd)
        argv = self.argv(attempt)
        prefix = self.limits_prefix(attempt)
        if prefix is not None:
            argv = trampoline(prefix, argv)
        try:
            return start(argv, attempt.env, attempt.cwd)
        except OSError as e:
            raise SandboxError(f"could not start bubblewrap ({self.bwrap}): {e}") from e
