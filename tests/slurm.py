"""A single-node Slurm cluster of the tests' own: munged, slurmctld and slurmd from Debian's
munge and slurm-wlm, configured in a temporary folder (own munge key and socket, free ports,
state and spool folders), this machine being its one node. A skip where it cannot be set up,
a failure in CI.

While the fixture lives (one test module), SLURM_CONF in this process's environment points at
the cluster, so the Slurm commands the provider runs (and any process this one starts) talk to
it. At the end, whatever still carries that SLURM_CONF (job steps, workers) is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pg import free_port

_DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI needs a Slurm cluster: {reason}")
    pytest.skip(reason)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    partition: str = "debug"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(args), env=self.env(), capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        if check:
            assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def squeue(self, *args: str) -> list[str]:
        """Lines of `squeue --noheader -o '%i %T %j' ARGS` (every job, expanded arrays)."""
        done = self.run("squeue", "--noheader", "--array", "-o", "%i %T %j", *args)
        return done.stdout.splitlines()

    def logs(self) -> str:
        text = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                text.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(text)


def _node_line() -> str:
    """This machine as a Slurm node (CPUs, sockets, cores, memory), named localhost."""
    found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    first = found.stdout.splitlines()[0] if found.stdout else ""
    words = [w for w in first.split() if not w.startswith(("NodeName=", "UpTime="))]
    if not any(w.startswith("CPUs=") for w in words):
        raise RuntimeError(f"slurmd -C said: {found.stdout}{found.stderr}")
    return " ".join(["NodeName=localhost", "NodeAddr=127.0.0.1", *words, "State=UNKNOWN"])


def _write_conf(root: Path, socket: Path) -> Path:
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=jobfleettest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
KillWait=3
MinJobAge=300
{_node_line()}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _ours(conf: Path) -> list[int]:
    """Processes started with our SLURM_CONF in their environment (slurmstepd, job scripts,
    the workers), which outlive slurmd."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
    return found


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running single-node cluster; SLURM_CONF points at it while the fixture lives."""
    missing = [d for d in _DAEMONS if shutil.which(d) is None
               and not Path("/usr/sbin", d).exists()]
    if missing:
        _unavailable(f"Slurm or munge is not installed (no {', '.join(missing)}):"
                     " apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        _unavailable("a test cluster's slurmd and munged need root")
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o700)
    (root / "munge").chmod(0o755)  # the socket must be reachable; the key stays 0600
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket = root / "munge" / "munge.socket"
    conf = _write_conf(root, socket)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen[bytes]] = []
    before = os.environ.get("SLURM_CONF")
    cluster = SlurmCluster(root, conf)

    def start(name: str, *args: str) -> None:
        out = open(root / f"{name}.out", "wb")  # noqa: SIM115 (the process holds it)
        procs.append(subprocess.Popen([name, *args], env=env, stdout=out, stderr=out,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        out.close()

    try:
        start("munged", "--foreground", "--force", f"--socket={socket}", f"--key-file={key}",
              f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
              f"--seed-file={root}/munge/seed")
        _wait(lambda: socket.exists(), 20, "munged to listen", cluster, procs)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-N", "localhost", "-f", str(conf))

        def idle() -> bool:
            done = cluster.run("sinfo", "--noheader", "-o", "%t", check=False)
            return done.returncode == 0 and done.stdout.strip() == "idle"

        _wait(idle, 60, "the node to be idle in sinfo", cluster, procs)
        os.environ["SLURM_CONF"] = str(conf)
        yield cluster
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        if procs and procs[-1].poll() is None:
            cluster.run("scancel", "--user=root", check=False)  # every job of this cluster
        _stop(procs)
        for pid in _ours(conf):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait(predicate: object, timeout: float, what: str, cluster: SlurmCluster,
          procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(map(str, dead))} exited" if dead else f"timed out after {timeout}s"
            _unavailable(f"Slurm did not start ({what}: {why})\n{cluster.logs()}")
        time.sleep(0.2)
