"""SSH hosts for the tests: Debian's OpenSSH server (`sshd`) run in the foreground on a
127.0.0.x address and a free port, with a host key and a client key of its own (ssh-keygen),
the client key authorized for the user running the tests.

Every "host" is this machine, reached through its own sshd: what the ssh provider does there
(files under ~/.cache/jobfleet, detached workers) is real. `ssh_hosts` gives two, on two
addresses, for the whole session. Without sshd the tests skip, saying why, except when CI is
set, where they fail.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path(os.environ.get("JOBFLEET_TEST_SSHD", "/usr/sbin/sshd"))
SFTP_SERVERS = (Path("/usr/lib/openssh/sftp-server"), Path("/usr/libexec/openssh/sftp-server"),
                Path("/usr/libexec/sftp-server"))


def unavailable(reason: str) -> None:
    """Skip: the machine cannot run sshd; in CI that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs sshd (apt-get install openssh-server): {reason}")
    pytest.skip(reason)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at `path` (and `path`.pub); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class SshHost:
    """One running sshd: reach it as `entry` with `key`, trusting `known_hosts`."""

    address: str
    port: int
    user: str
    key: Path  # the client's private key
    known_hosts: Path  # this host's key, for the client to check
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def entry(self) -> str:
        """The host as the ssh provider's `hosts` setting writes it."""
        return f"{self.user}@{self.address}:{self.port}"

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_sshd(folder: Path, address: str, client_key: Path, client_public: str) -> SshHost:
    """An sshd on `address` (a free port), its files in `folder`, that lets the current user
    in with `client_key`."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        unavailable(f"no {SSHD} or ssh-keygen (apt-get install openssh-server)")
    sftp = next((p for p in SFTP_SERVERS if p.exists()), None)
    if sftp is None:
        unavailable("no sftp-server (it comes with openssh-server)")
    folder.mkdir(parents=True, exist_ok=True)
    host_key = folder / "host_key"
    host_public = _keygen(host_key, f"jobfleet-test-host-{address}")
    authorized = folder / "authorized_keys"
    authorized.write_text(client_public + "\n")
    authorized.chmod(0o600)
    port = _free_port(address)
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        f"ListenAddress {address}",
        f"HostKey {host_key}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "StrictModes no",
        "UsePAM no",
        "MaxStartups 100",
        "MaxSessions 50",
        "LogLevel VERBOSE",
        f"Subsystem sftp {sftp}",
        "",
    ]))
    if os.geteuid() == 0:  # sshd insists on its privilege separation folder
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[{address}]:{port} {host_public}\n")
    log = folder / "sshd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    host = SshHost(address, port, getpass.getuser(), client_key, known_hosts, log, process)
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            unavailable(f"sshd on {address}:{port} exited {process.returncode}: "
                        + log.read_text(errors="replace")[-2000:])
        with socket.socket() as s:
            if s.connect_ex((address, port)) == 0:
                return host
        if time.monotonic() > deadline:
            host.stop()
            unavailable(f"sshd on {address}:{port} did not listen within 20 s: "
                        + log.read_text(errors="replace")[-2000:])
        time.sleep(0.05)


@pytest.fixture(scope="session")
def ssh_hosts() -> Iterator[list[SshHost]]:
    """Two sshd "hosts", 127.0.0.2 and 127.0.0.3, sharing one client key."""
    folder = Path(tempfile.mkdtemp(prefix="jobfleet-sshd-"))
    hosts: list[SshHost] = []
    try:
        if shutil.which("ssh-keygen") is None:
            unavailable("no ssh-keygen (apt-get install openssh-server)")
        client_key = folder / "client_key"
        client_public = _keygen(client_key, "jobfleet-test-client")
        for i, address in enumerate(("127.0.0.2", "127.0.0.3")):
            hosts.append(start_sshd(folder / f"host{i}", address, client_key, client_public))
        yield hosts
    finally:
        for host in hosts:
            host.stop()
        shutil.rmtree(folder, ignore_errors=True)
