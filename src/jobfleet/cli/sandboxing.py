"""Sandbox options shared by `run` and `worker`, and `jobfleet test`, which probes a sandbox."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from jobfleet.cli.app import app, out
from jobfleet.cli.fmt import size
from jobfleet.errors import ConfigError

SandboxOpt = Annotated[str, typer.Option(
    "--sandbox", metavar="NAME",
    help="How jobs run: process (own process group, limits, clean environment), bwrap "
         "(bubblewrap: read-only system, no network) or container (docker/podman).")]
InheritEnvOpt = Annotated[bool, typer.Option(
    "--inherit-env", help="Jobs see this shell's whole environment, not only PATH, LANG, "
                          "LC_*, TERM, TZ, USER, LOGNAME (and their env columns).")]
KeepWorkspacesOpt = Annotated[bool, typer.Option(
    "--keep-workspaces", help="Keep each attempt's workspace folder (its HOME and TMPDIR), "
                              "for debugging.")]
AllowSandboxOpt = Annotated[list[str] | None, typer.Option(
    "--allow-sandbox", metavar="NAME", help="A sandbox jobs may ask for with `sandbox` "
                                            "(repeatable).")]
NetworkOpt = Annotated[bool, typer.Option(
    "--allow-network/--no-network",
    help="Give jobs that ask for `network: true` the network (bwrap, container).")]
GpusOpt = Annotated[str | None, typer.Option(
    "--gpus", metavar="N|IDS", help="GPUs to offer jobs: a count, or device ids like 0,1 "
                                    "(default: those in /proc/driver/nvidia/gpus).")]


def parse_gpus(value: str | None) -> tuple[str, ...]:
    """Device ids from `--gpus 2` (0 and 1) or `--gpus 0,3`; detected when not given."""
    if value is None:
        try:
            return tuple(str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus"))))
        except OSError:
            return ()
    text = value.strip()
    if text.isdigit():
        return tuple(str(i) for i in range(int(text)))
    ids = tuple(p.strip() for p in text.split(",") if p.strip())
    if not ids or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {value!r} is neither a count nor a list of device ids",
                          hint="write e.g. --gpus 2, or --gpus 0,1")
    return ids


def sandbox_options(sandbox: str, inherit_env: bool, keep_workspaces: bool,
                    allow_sandbox: list[str] | None, allow_network: bool,
                    gpus: str | None) -> dict[str, Any]:
    """WorkerOptions fields from the sandbox flags."""
    from jobfleet.sandbox import SANDBOXES, SandboxError

    for name in (sandbox, *(allow_sandbox or ())):
        if name not in SANDBOXES:
            raise SandboxError(f"there is no sandbox called {name!r}",
                               hint=f"choose one of: {', '.join(SANDBOXES)}")
    ids = parse_gpus(gpus)
    return {"sandbox": sandbox, "inherit_env": inherit_env, "keep_workspaces": keep_workspaces,
            "allow_sandboxes": tuple(allow_sandbox or ()), "allow_network": allow_network,
            "gpus": len(ids), "gpu_ids": ids}


#: the probe job: prints, as one JSON line, what it can see and do
PROBE = r'''
import json, os, resource, socket, sys, tempfile
port, worker_home = int(sys.argv[1]), sys.argv[2]

def reach(host, port):
    try:
        with socket.create_connection((host, port), timeout=1.5):
            return "reachable"
    except OSError as e:
        return "unreachable (%s)" % (e.strerror or type(e).__name__)

def writable(path):
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".jobfleet-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True

def readable(path):
    try:
        if os.path.isdir(path):
            return "a folder of %d entries" % len(os.listdir(path))
        open(path, "rb").close()
        return "readable"
    except OSError as e:
        return "not readable (%s)" % (e.strerror or type(e).__name__)

def cgroup_limit():
    try:
        for line in open("/proc/self/cgroup"):
            _, ctrl, path = line.strip().split(":", 2)
            if "memory" in ctrl.split(","):
                with open("/sys/fs/cgroup/memory%s/memory.limit_in_bytes" % path) as f:
                    return int(f.read())
    except (OSError, ValueError):
        return None

soft, _ = resource.getrlimit(resource.RLIMIT_AS)
places = ["/", "/etc", "/usr", "/tmp", os.getcwd(), os.environ.get("HOME", ""), worker_home,
          "/root", "/home", "/var/tmp"]
print(json.dumps({
    "user": "%d:%d" % (os.getuid(), os.getgid()),
    "cwd": os.getcwd(),
    "env": sorted(os.environ),
    "network": {"127.0.0.1:%d" % port: reach("127.0.0.1", port),
                "169.254.169.254:80": reach("169.254.169.254", 80)},
    "writable": [p for p in dict.fromkeys(places) if p and writable(p)],
    "visible": {p: readable(p) for p in (worker_home, "/home", "/etc/shadow", "/etc/ssh",
                                         "/run", "/var/run/docker.sock") if p},
    "limits": {"address_space": None if soft == resource.RLIM_INFINITY else soft,
               "cgroup_memory": cgroup_limit(),
               "cpus": len(os.sched_getaffinity(0)),
               "processes_visible": sum(1 for p in os.listdir("/proc") if p.isdigit())},
}))
'''


def _listen() -> tuple[socket.socket, int]:
    """A listener on 127.0.0.1 that accepts (and drops) connections, to test reachability."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def probe(sandbox: str, memory: int) -> tuple[dict[str, Any] | None, str, str]:
    """Run the probe job through `sandbox` here; (its report or None, job status, reason)."""
    from jobfleet.blobs import open_blobs
    from jobfleet.spec import JobSpec
    from jobfleet.store import NewRun, open_store
    from jobfleet.worker import Worker, WorkerOptions

    server, port = _listen()
    with tempfile.TemporaryDirectory(prefix="jobfleet-test-") as tmp:
        folder = Path(tmp)
        (folder / "probe.py").write_text(PROBE)
        command = f"{sys.executable} -I probe.py {port} {Path.home()}"
        db = open_store(folder / "store.db")
        blobs = open_blobs(str(folder / "blobs"))
        job = JobSpec(command, name="probe", memory=memory, timeout=60.0, max_attempts=1)
        run_id = db.submit(NewRun(name="sandbox probe", source="jobfleet test",
                                  workdir=str(folder)), [job])
        worker = Worker(db, blobs, WorkerOptions(slots=1, sandbox=sandbox, run_id=run_id,
                                                 until_done=True, lease_seconds=30))
        worker.run(handle_signals=False)
        server.close()
        enforced = f"{size(memory)} through {worker.memory_limits}"
        [result] = db.jobs(run_id)
        text = (folder / "blobs" / "logs" / run_id / "1-1.log")
        output = text.read_text() if text.exists() else ""
        db.close()
    report = None
    for line in output.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
            report["limits"]["memory_limit"] = enforced
    return report, result.state, result.reason or output.strip()[-500:]


@app.command("test")
def test_sandbox(
    sandbox: SandboxOpt = "process",
    memory: Annotated[str, typer.Option(
        "--memory", help="Memory limit to give the probe job.")] = "512MiB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run a probe job through a sandbox on this machine and say what it could see and do."""
    from jobfleet.spec import parse_size

    sandbox_options(sandbox, False, False, None, True, "0")  # a bad name fails here
    report, state, reason = probe(sandbox, parse_size(memory))
    if report is None:
        out.print(f"[red]the probe job did not report[/] ({state}): {reason}")
        raise typer.Exit(1)
    if as_json:
        out.print(json.dumps({"sandbox": sandbox, **report}, indent=2))
        return
    limits = report["limits"]
    out.print(f"sandbox [bold]{sandbox}[/]: the probe job ran as user {report['user']} "
              f"in {report['cwd']}")
    out.print(f"  environment: {', '.join(report['env'])}")
    for target, how in report["network"].items():
        out.print(f"  network: {target} {how}")
    out.print(f"  writable: {', '.join(report['writable']) or 'nothing'}")
    if sandbox == "bwrap":
        out.print("    (/ and the folders bubblewrap makes for its mounts are its own, in memory: "
                  "nothing written there reaches this machine's disk)")
    for path, seen in report["visible"].items():
        out.print(f"  {path}: {seen}")
    group, space = limits["cgroup_memory"], limits["address_space"]
    out.print(f"  limits: memory {limits['memory_limit']}; seen from inside: control group "
              f"{size(group) if group else 'not visible'}, address space "
              f"{size(space) if space else 'unlimited'}; {limits['cpus']} cpus; "
              f"{limits['processes_visible']} processes visible")
