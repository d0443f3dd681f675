"""Sandboxes: what a job can see and reach, its limits, its workspace, secrets and GPUs.

Every test runs the real CLI (`jf`). bwrap tests skip where bubblewrap is missing (and fail
under CI, whose setup installs it); container tests skip where no engine is usable.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import Jobfleet, pids_with, wait_for, write_csv
from jobfleet.blobs.base import LogWriter
from jobfleet.sandbox.cgroup import ROOT
from jobfleet.sandbox.container import find_engine
from jobfleet.worker.limits import Redactor

HAVE_BWRAP = shutil.which("bwrap") is not None
if not HAVE_BWRAP and os.environ.get("CI"):
    raise RuntimeError("CI: bubblewrap is missing (apt-get install bubblewrap)")
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed")
HAVE_CGROUP = os.access(os.path.join(ROOT, "memory"), os.W_OK)
SANDBOXES = ["process", pytest.param("bwrap", marks=needs_bwrap)]
PY = sys.executable


def run(jf: Jobfleet, header: list[str], rows: list[list[object]], *flags: str,
        check: int = 0, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    """`jobfleet run` a CSV of jobs; the jobs' JSON by seq."""
    write_csv(jf.cwd / "jobs.csv", header, rows)
    p = jf("run", "jobs.csv", *flags, check=check, env=env, timeout=120)
    run_id = p.stdout.split()[1].rstrip(":")
    jobs = jf.json("jobs", run_id)
    return {str(j["seq"]): {**j, "log": jf.log(j["run"], j["seq"], j["attempts"] or 1)}
            for j in jobs}


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_job_cannot_see_the_workers_secrets(jf: Jobfleet, sandbox: str) -> None:
    jobs = run(jf, ["command", "env.MINE"], [["env", "visible"]], "--sandbox", sandbox,
               env={"AWS_SECRET_ACCESS_KEY": "wk-s3cr3t", "DATABASE_URL": "postgres://x:pw@h"})
    log = str(jobs["1"]["log"])
    assert "wk-s3cr3t" not in log and "DATABASE_URL" not in log
    assert "JOBFLEET_STORE" not in log  # the store's location is the worker's, not the job's
    names = {line.split("=", 1)[0] for line in log.splitlines()}
    assert {"PATH", "HOME", "TMPDIR", "MINE", "JOBFLEET_JOB_ID", "JOBFLEET_ATTEMPT"} <= names


def test_inherit_env_passes_the_workers_environment(jf: Jobfleet) -> None:
    jobs = run(jf, ["command"], [["env"]], "--inherit-env", env={"FROM_SHELL": "yes"})
    assert "FROM_SHELL=yes" in str(jobs["1"]["log"])


def test_each_attempt_has_an_empty_workspace_that_is_removed(jf: Jobfleet) -> None:
    cmd = 'echo "$HOME $TMPDIR $(ls -A "$HOME" | wc -l)"; touch "$HOME/left-behind"'
    tidy = 'echo "$HOME $TMPDIR $(ls -A "$HOME" | wc -l)"'
    jobs = run(jf, ["command"], [[cmd], [cmd], [tidy], [tidy]], "--slots", "1")
    seen = [str(jobs[s]["log"]).split() for s in ("1", "2", "3", "4")]
    assert all(home == tmp and left == "0" for home, tmp, left in seen), seen
    assert seen[0][0] != seen[1][0]  # a workspace with something left in it is not reused
    assert seen[2][0] == seen[3][0]  # an empty one is
    assert not any(Path(home).parent.exists() for home, _, _ in seen)
    kept = run(jf, ["command"], [[cmd], [cmd]], "--keep-workspaces", "--slots", "1")
    homes = [Path(str(kept[s]["log"]).split()[0]) for s in ("1", "2")]
    assert homes[0] != homes[1] and all((h / "left-behind").exists() for h in homes)
    # the next worker on this machine tidies up after dead workers, but not what was kept
    run(jf, ["command"], [[tidy]])
    assert all((h / "left-behind").exists() for h in homes)
    shutil.rmtree(homes[0].parent)


@needs_bwrap
def test_bwrap_cuts_off_localhost_and_the_workers_home(jf: Jobfleet) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    home_file = Path.home() / f".jobfleet-test-{secrets.token_hex(4)}"
    home_file.write_text("the worker's own file\n")
    try:
        connect = f"{PY} -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2)'"
        jobs = run(jf, ["command"], [[connect], [f"cat {home_file}"],
                                     ["echo written > here.txt"]],
                   "--sandbox", "bwrap", check=1)
        # the same connection works outside the sandbox: the listener is real
        plain = run(jf, ["command"], [[connect]], "--sandbox", "process")
    finally:
        server.close()
        home_file.unlink()
    assert jobs["1"]["state"] == "failed" and "Connection refused" in str(jobs["1"]["log"])
    assert jobs["2"]["state"] == "failed" and "No such file" in str(jobs["2"]["log"])
    assert jobs["3"]["state"] == "succeeded"  # the job's workdir stays writable
    assert (jf.cwd / "here.txt").read_text() == "written\n"
    assert plain["1"]["state"] == "succeeded"


@pytest.mark.skipif(not HAVE_CGROUP, reason="no writable cgroup v1 memory controller here")
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_job_over_its_memory_limit_is_out_of_memory(jf: Jobfleet, sandbox: str) -> None:
    hog = f"{PY} -c 'b = bytearray(400 * 2**20); print(len(b))'"
    jobs = run(jf, ["command", "memory", "max_attempts"],
               [[hog, "100MB", 1], [hog, "1GB", 1]], "--sandbox", sandbox, check=1)
    assert jobs["1"]["state"] == "failed"
    assert str(jobs["1"]["reason"]).startswith("out of memory"), jobs["1"]
    assert jobs["2"]["state"] == "succeeded", jobs["2"]
    assert not os.path.exists(os.path.join(ROOT, "memory", "jobfleet", f"w{jobs['1']['run']}"))


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_timed_out_job_leaves_no_process_behind(jf: Jobfleet, marker: str, sandbox: str
                                                  ) -> None:
    children = f"sleep {marker} & sleep {marker} & (sleep {marker} &); sleep {marker}"
    rows: list[list[object]] = [[children, "1s", "", 1]]
    if sandbox == "bwrap" or HAVE_CGROUP:  # a child in a new session: only the namespace or
        escapee = f"setsid sleep {marker} & sleep {marker}"  # the control group catch it
        rows.append([escapee, "1s", "" if sandbox == "bwrap" else "1GB", 1])
    jobs = run(jf, ["command", "timeout", "memory", "max_attempts"], rows,
               "--sandbox", sandbox, check=1, env={"JOBFLEET_KILL_GRACE": "0.5"})
    assert all(j["reason"] == "timed out after 1s" for j in jobs.values()), jobs
    wait_for(lambda: not pids_with(marker), 5, what="the jobs' processes to be gone")


def test_a_secret_never_reaches_a_stored_log_or_event(jf: Jobfleet) -> None:
    secret = "tok-" + secrets.token_hex(12)
    # the secret printed whole, split over two writes, and across the 64 KiB read size
    script = ("import sys, time; s = sys.argv[1]; w = sys.stdout.write; f = sys.stdout.flush\n"
              "w(s + '\\n'); f(); w(s[:7]); f(); time.sleep(0.2); w(s[7:] + '\\n'); f()\n"
              "w('x' * 65530 + s + '\\n'); f(); sys.exit('failed with ' + s)")
    (jf.cwd / "leak.py").write_text(script)
    (jf.cwd / "token.txt").write_text(secret + "\n")
    jobs = run(jf, ["command", "env.TOKEN", "env.OTHER", "max_attempts"],
               [[f'{PY} leak.py "$TOKEN"', "secret:env:MY_TOKEN", "plain", 1],
                [f'{PY} leak.py "$OTHER"', "", "secret:file:token.txt", 1]],
               check=1, env={"MY_TOKEN": secret})
    for j in jobs.values():
        assert str(j["log"]).count("[redacted]") >= 4, j["log"]
    for path in jf.blobs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    db = sqlite3.connect(jf.store_path)
    rows = db.execute("SELECT * FROM events").fetchall()
    assert rows and secret not in repr(rows)
    assert secret not in repr(db.execute("SELECT reason FROM jobs").fetchall())
    out = jf("jobs", str(jobs["1"]["run"]), "--json", check=0).stdout
    assert secret not in out


class _Memory(LogWriter):
    def __init__(self) -> None:
        self.key, self.written, self.due_at, self.data = "k", False, None, b""

    def write(self, data: bytes) -> None:
        self.data += data
        self.written = True

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def test_redaction_finds_a_value_split_anywhere() -> None:
    text = b"a-secret-value and again a-secret-value, and a-secret"
    for cut in range(len(text)):
        inner = _Memory()
        w = Redactor(inner, ["a-secret-value", "secret"])
        w.write(text[:cut])
        w.write(text[cut:])
        w.close()
        assert inner.data == b"[redacted] and again [redacted], and a-[redacted]", cut


def test_each_job_gets_its_own_gpus(jf: Jobfleet) -> None:
    cmd = f'{PY} -c "import os, time; a = time.time(); time.sleep(0.3); ' \
          f'print(os.environ.get(\'CUDA_VISIBLE_DEVICES\'), a, time.time())"'
    jobs = run(jf, ["command", "gpus"], [[cmd, 1]] * 6 + [[cmd, 2], [cmd, 0]],
               "--gpus", "0,1", "--slots", "4")
    spans = []
    for seq, j in jobs.items():
        devices, start, end = str(j["log"]).split()
        if seq == "8":
            assert devices == "None"
            continue
        assert devices in (("0,1",) if seq == "7" else ("0", "1")), j
        spans += [(d, float(start), float(end)) for d in devices.split(",")]
    for d, a, b in spans:  # never two jobs on one device at once
        assert not any(d == d2 and a < b2 and a2 < b and (a, b) != (a2, b2)
                       for d2, a2, b2 in spans)


def test_a_job_asking_for_more_gpus_than_there_are_is_refused(jf: Jobfleet) -> None:
    write_csv(jf.cwd / "jobs.csv", ["command", "gpus"], [["true", 3]])
    p = jf("run", "jobs.csv", "--gpus", "0,1", check=2)
    assert "3 gpus" in p.stderr and "2 gpus" in p.stderr


def test_jobfleet_test_reports_what_the_probe_saw(jf: Jobfleet) -> None:
    p = jf("test", check=0, env={"WORKER_ONLY_SECRET": "x"})
    assert "sandbox process" in p.stdout and "WORKER_ONLY_SECRET" not in p.stdout
    assert "127.0.0.1" in p.stdout and "169.254.169.254" in p.stdout


@needs_bwrap
def test_jobfleet_test_bwrap(jf: Jobfleet) -> None:
    report = jf.json("test", "--sandbox", "bwrap")
    assert report["network"][next(iter(report["network"]))].startswith("unreachable")
    assert report["visible"]["/etc/shadow"].startswith("not readable")
    assert "/usr" not in report["writable"] and "/etc" not in report["writable"]
    p = jf("test", "--sandbox", "bwrap", check=0)
    assert "sandbox bwrap" in p.stdout


ENGINE, WHY_NO_ENGINE = find_engine()


def test_container_without_an_engine_fails_at_start_up(jf: Jobfleet) -> None:
    if ENGINE is not None:
        pytest.skip(f"a container engine is usable here ({ENGINE})")
    p = jf("worker", "--sandbox", "container", "--idle-exit", "1", check=2)
    assert "container sandbox has no container engine" in p.stderr
    assert "--sandbox process" in p.stderr


@pytest.mark.skipif(ENGINE is None, reason=f"no usable container engine: {WHY_NO_ENGINE}")
def test_container_runs_a_job_without_network(jf: Jobfleet) -> None:
    jobs = run(jf, ["command", "image"], [["cat /etc/os-release; echo ok > out.txt", "debian:stable-slim"]],
               "--sandbox", "container")
    assert jobs["1"]["state"] == "succeeded" and (jf.cwd / "out.txt").exists()


def test_an_unknown_sandbox_is_refused(jf: Jobfleet) -> None:
    write_csv(jf.cwd / "jobs.csv", ["command"], [["true"]])
    p = jf("run", "jobs.csv", "--sandbox", "vm", check=2)
    assert "no sandbox called 'vm'" in p.stderr


@needs_bwrap
def test_a_job_may_ask_for_a_sandbox_the_worker_allows(jf: Jobfleet) -> None:
    jobs = run(jf, ["command", "sandbox", "max_attempts"],
               [["ls /root | wc -l", "bwrap", 1], ["ls /root > /dev/null", "", 1]],
               "--allow-sandbox", "bwrap")
    assert jobs["1"]["state"] == "succeeded"
    refused = run(jf, ["command", "sandbox", "max_attempts"], [["true", "bwrap", 1]], check=1)
    assert str(refused["1"]["reason"]).startswith("sandbox error: the job asks for the bwrap")


def test_without_a_control_group_memory_is_an_address_space_limit(tmp_path: Path) -> None:
    from jobfleet.sandbox import Attempt, ProcessSandbox

    box = ProcessSandbox(cgroups=None)
    attempt = Attempt("ulimit -v", str(tmp_path), [b"PATH=/usr/bin:/bin"], str(tmp_path),
                      memory=256 * 2**20)
    box.prepare(attempt)
    child = box.run(attempt)
    wait_for(lambda: os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOWAIT), 10)
    assert child.reap()[0] == 0
    assert os.read(child.out, 100) == b"262144\n"
    assert box.teardown(attempt).out_of_memory is False


def test_failure_reasons_say_what_happened() -> None:
    from jobfleet.worker.limits import failure_reason

    assert failure_reason(1, None, 0, oom=False, address_space=False) == "exit code 1"
    assert failure_reason(None, 15, 0, oom=False, address_space=False) == "killed by signal 15"
    assert failure_reason(None, 9, 2**30, oom=True, address_space=False) == (
        "out of memory (over its limit of 1GiB)")
    assert failure_reason(None, 9, 2**20, oom=False, address_space=True).startswith(
        "out of memory (killed by signal 9 under its address-space limit")
    assert failure_reason(None, 9, 2**20, oom=False, address_space=False) == "killed by signal 9"


def test_a_worker_sweeps_the_folders_of_workers_that_died(jf: Jobfleet) -> None:
    import subprocess
    import tempfile

    from jobfleet.sandbox.base import _WORKSPACES
    from jobfleet.sandbox.cgroup import _NS

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now
    space = Path(tempfile.gettempdir()) / f"{_WORKSPACES}{gone.pid}-wdead"
    (space / "a1").mkdir(parents=True)
    group = Path(ROOT) / "memory" / "jobfleet" / f"{_NS}{gone.pid}-wdead"
    if HAVE_CGROUP:
        (group / "a1").mkdir(parents=True)
    run(jf, ["command", "memory"], [["true", "100MB"]])
    assert not space.exists() and not group.exists()
