"""The ssh provider against real sshd "hosts" (tests/sshd.py: this machine, reached through
Debian's OpenSSH server on 127.0.0.2 and 127.0.0.3): workers bootstrapped there (this very
jobfleet installed into ~/.cache/jobfleet/venv-VERSION, made once and then reused), serving a
PostgreSQL store; a host whose setup fails is left out; settings checked before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Jobfleet, pids_with, wait_for, write_csv
from sshd import SshHost, ssh_hosts  # noqa: F401 (a fixture)

# the first bootstrap of a session may build the hosts' virtualenv (pip, maybe a download)
pytestmark = pytest.mark.timeout(900)
FIRST_BOOTSTRAP = 600.0
FLEETS = Path.home() / ".cache" / "jobfleet" / "fleets"


@pytest.fixture
def fleet() -> Iterator[str]:
    """A fleet name of the test's own; whatever of it is left at the end is killed and its
    folder on the "hosts" removed."""
    name = f"t{secrets.token_hex(4)}"
    yield name
    for pid in pids_with(f"--id {name}-"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(FLEETS / name, ignore_errors=True)


class Recorder:
    """on_change: every machine's phases, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Any] = []

    def __call__(self, machine: Any) -> None:
        with self.lock:
            self.seen.append(machine)

    def phases(self, machine_id: str) -> list[str]:
        with self.lock:
            return [m.phase for m in self.seen if m.id == machine_id]

    def last(self, machine_id: str) -> Any:
        with self.lock:
            return [m for m in self.seen if m.id == machine_id][-1]


@pytest.fixture
def providers() -> Iterator[list[Any]]:
    """Providers a test makes, closed at its end."""
    made: list[Any] = []
    yield made
    for p in made:
        p.close()


def make(providers: list[Any], fleet: str, on: list[SshHost], **settings: Any) -> Any:
    """An ssh provider for the hosts `on` (the test's key, their known host keys) that
    records its machines' phases; `settings` add to or replace those."""
    from jobfleet.fleet import provider_named

    recorder = Recorder()
    provider = provider_named("ssh", fleet, {
        "hosts": ",".join(h.entry for h in on), "ssh_key": str(on[0].key),
        "known_hosts": _known_hosts(on), **settings}, recorder)
    provider.recorder = recorder
    providers.append(provider)
    return provider


def _known_hosts(hosts: list[SshHost]) -> str:
    """One known_hosts file for these hosts."""
    path = hosts[0].known_hosts.parent.parent / "known_hosts"
    path.write_text("".join(h.known_hosts.read_text() for h in hosts))
    return str(path)


@pytest.fixture
def pg_with_password() -> Iterator[tuple[str, str]]:
    """A fresh database owned by a role of its own with a password: (URL with the password,
    the password). The server trusts 127.0.0.1, so the password is carried, not checked."""
    import psycopg

    from pg import fresh_database, require_server

    server = require_server()
    role = f"jf_ssh_{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(8)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        with fresh_database(server) as url:
            name = url.rsplit("/", 1)[-1]
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(f"ALTER DATABASE {name} OWNER TO {role}")
            yield url.replace("postgres@", f"{role}:{password}@", 1), password
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")


class CommandLineWatch:
    """Reads every process's command line, over and over, until stopped: the lines that
    contain `secret`, and whether any process was seen at all."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.found: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        line = Path(f"/proc/{entry}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if self.secret in line:
                        self.found.append(line.replace(b"\0", b" ").decode(errors="replace"))
            self.rounds += 1
            self._stop.wait(0.05)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        return self.found


def worker_pid(fleet: str, worker_id: str) -> int:
    return int((FLEETS / fleet / f"{worker_id}.pid").read_text())


def submit(url: str, commands: list[str], workdir: Path) -> str:
    from jobfleet.spec.model import JobSpec
    from jobfleet.store import NewRun, open_store

    with open_store(url) as db:
        return db.submit(NewRun(name="ssh test", workdir=str(workdir)),
                         [JobSpec(c) for c in commands])


def counts(url: str, run: str) -> dict[str, int]:
    from jobfleet.store import open_store

    with open_store(url) as db:
        return db.counts(run)


def test_two_hosts_bootstrap_run_the_jobs_and_stop_leaving_nothing(
        ssh_hosts: list[SshHost], fleet: str, providers: list[Any],  # noqa: F811
        pg_with_password: tuple[str, str], tmp_path: Path) -> None:
    from jobfleet.fleet import LaunchSpec

    url, password = pg_with_password
    watch = CommandLineWatch(password)
    run = submit(url, [f"sleep 0.1; echo job {i}" for i in range(1, 41)], tmp_path)
    provider = make(providers, fleet, ssh_hosts)
    spec = LaunchSpec(fleet=fleet, run_id=run, slots=2, idle_exit=120,
                      env={"JOBFLEET_STORE": url, "JOBFLEET_BLOBS": str(tmp_path / "blobs")})

    launched = provider.launch(2, spec)
    assert [m.phase for m in launched] == ["launching", "launching"]
    assert {m.host for m in launched} == {h.entry for h in ssh_hosts}  # round robin
    ids = [m.id for m in launched]
    for m in launched:
        assert m.id == f"{m.host.split('@')[1]}/{m.worker_id}"
        assert m.worker_id.startswith(f"{fleet}-")

    def phase(machine_id: str) -> str:
        phases = provider.recorder.phases(machine_id)
        return phases[-1] if phases else "launching"

    wait_for(lambda: all(phase(i) not in ("launching", "bootstrapping") for i in ids),
             FIRST_BOOTSTRAP, interval=0.2, what="both workers to bootstrap")
    for i in ids:
        last = provider.recorder.last(i)
        assert last.phase == "ready", (last.reason, last.log_tail)
        assert provider.recorder.phases(i) == ["bootstrapping", "ready"]

    wait_for(lambda: counts(url, run)["succeeded"] == 40, 120, interval=0.2,
             what="the 40 jobs to succeed on the ssh workers")
    listed = {m.id: m for m in provider.list()}
    assert set(listed) == set(ids), listed
    assert all(m.phase == "ready" and m.run_id == run for m in listed.values()), listed
    assert (tmp_path / "blobs" / "logs" / run / "7-1.log").read_text() == "job 7\n"

    from jobfleet.store import open_store

    with open_store(url) as db:
        served = {w.id: w for w in db.workers()}
    assert set(served) == {m.worker_id for m in launched}
    # the store's password reached the workers through their environment only
    for m in launched:
        environ = Path(f"/proc/{worker_pid(fleet, m.worker_id)}/environ").read_bytes()
        assert password.encode() in environ

    # a second lister (as `jobfleet fleet status` is) sees the same, from the hosts' files
    other = make(providers, fleet, ssh_hosts)
    assert {m.id: m.phase for m in other.list()} == dict.fromkeys(ids, "ready")

    provider.terminate(ids)
    after = {m.id: m for m in other.list()}
    assert {i: m.phase for i, m in after.items()} == dict.fromkeys(ids, "stopped")
    assert all(m.reason == "terminated" for m in after.values())
    assert all(any("stopped" in line for line in m.log_tail) for m in after.values()), after
    assert provider.recorder.phases(ids[0])[-1] == "stopped"
    assert pids_with(f"--id {fleet}-") == []
    assert not list((FLEETS / fleet).glob("*.pid"))
    with open_store(url) as db:  # they drained: stopped, with every job counted
        served = {w.id: w for w in db.workers()}
    assert {w.state for w in served.values()} == {"stopped"}
    assert sum(w.jobs_done for w in served.values()) == 40
    assert watch.stop() == [] and watch.rounds > 10


SETUP = """#!/bin/sh
echo "checking the GPU driver"
case "$SSH_CONNECTION" in
  *" 127.0.0.3 "*) echo "nvidia-smi: command not found" >&2; exit 1 ;;
esac
echo "driver ok for $JOBFLEET_WORKER_ID"
"""


def test_a_host_whose_setup_fails_is_left_out_and_the_other_runs_the_jobs(
        ssh_hosts: list[SshHost], fleet: str, providers: list[Any],  # noqa: F811
        tmp_path: Path) -> None:
    from jobfleet.fleet import LaunchSpec
    from pg import fresh_database, require_server

    good, bad = ssh_hosts
    script = tmp_path / "setup.sh"
    script.write_text(SETUP)
    provider = make(providers, fleet, ssh_hosts, setup=str(script), workers_per_host=2,
                    bootstrap_attempts=2)
    with fresh_database(require_server()) as url:
        run = submit(url, [f"echo job {i}" for i in range(1, 21)], tmp_path)
        spec = LaunchSpec(fleet=fleet, run_id=run, idle_exit=120,
                          env={"JOBFLEET_STORE": url, "JOBFLEET_BLOBS": str(tmp_path / "blobs")})
        launched = {m.host: m for m in provider.launch(2, spec)}
        ok, failing = launched[good.entry], launched[bad.entry]

        def settled(machine_id: str) -> bool:
            phases = provider.recorder.phases(machine_id)
            return bool(phases) and phases[-1] in ("ready", "failed")

        wait_for(lambda: settled(ok.id) and settled(failing.id), FIRST_BOOTSTRAP,
                 interval=0.2, what="both bootstraps to end")
        assert provider.recorder.last(ok.id).phase == "ready"
        failed = provider.recorder.last(failing.id)
        assert failed.phase == "failed" and failed.attempts == 2
        assert "setup script setup.sh exited 1" in failed.reason, failed.reason
        assert "nvidia-smi: command not found" in failed.log_tail, failed.log_tail
        assert provider.recorder.phases(failing.id) == [
            "bootstrapping", "bootstrapping", "failed"]
        setup_log = (FLEETS / fleet / f"{failing.worker_id}.setup.log").read_text()
        assert setup_log.count("bootstrap attempt") == 2

        wait_for(lambda: counts(url, run)["succeeded"] == 20, 60, interval=0.2,
                 what="the jobs to succeed on the host that bootstrapped")
        # the failed host is left out: another worker goes to the good host
        more = provider.launch(1, spec)
        assert more[0].host == good.entry, more

        listed = {m.id: m for m in make(providers, fleet, ssh_hosts).list()}
        assert listed[ok.id].phase == "ready"
        assert listed[failing.id].phase == "failed"
        assert "exited 1" in listed[failing.id].reason
        assert "nvidia-smi: command not found" in listed[failing.id].log_tail
        assert (FLEETS / fleet / f"{ok.worker_id}.setup.log").read_text().count(
            f"driver ok for {ok.worker_id}") == 1

        wait_for(lambda: provider.recorder.phases(more[0].id)[-1:] == ["ready"], 60,
                 interval=0.2, what="the third worker to bootstrap")
        provider.terminate([ok.id, failing.id, more[0].id])
        assert [m.phase for m in provider.list() if m.phase in ("launching", "bootstrapping",
                                                               "ready")] == []
        assert pids_with(f"--id {fleet}-") == []


def test_a_worker_stopped_while_it_bootstraps_never_starts(
        ssh_hosts: list[SshHost], fleet: str, providers: list[Any], marker: str,  # noqa: F811
        tmp_path: Path) -> None:
    """install = never with an interpreter that has jobfleet (this test's own); a setup
    script that takes its time; terminate during it: the setup script is stopped, the worker
    never starts."""
    import sys
    import time

    from jobfleet.fleet import LaunchSpec

    script = tmp_path / "slow-setup.sh"
    script.write_text(f"echo preparing\nsleep {marker}\n")
    provider = make(providers, fleet, ssh_hosts[:1], install="never", python=sys.executable,
                    setup=str(script))
    spec = LaunchSpec(fleet=fleet, run_id=None, env={"JOBFLEET_STORE": str(tmp_path / "db")})
    [machine] = provider.launch(1, spec)
    wait_for(lambda: pids_with(marker), 60, interval=0.1, what="the setup script to run")
    other = make(providers, fleet, ssh_hosts[:1])
    assert [m.phase for m in other.list()] == ["bootstrapping"]
    setup_log = (FLEETS / fleet / f"{machine.worker_id}.setup.log").read_text()
    assert f"{sys.executable} imports jobfleet" in setup_log, setup_log

    started = time.monotonic()
    provider.terminate([machine.id])
    assert time.monotonic() - started < 10
    assert provider.recorder.phases(machine.id) == ["bootstrapping", "stopped"]
    [listed] = other.list()
    assert listed.phase == "stopped", listed
    assert not (FLEETS / fleet / f"{machine.worker_id}.pid").exists()
    assert pids_with(f"--id {fleet}-") == []
    wait_for(lambda: not pids_with(marker), 10, interval=0.1, what="the setup script to stop")


def test_terminating_a_busy_worker_hands_its_job_back_and_leaves_nothing_running(
        ssh_hosts: list[SshHost], fleet: str, providers: list[Any], marker: str,  # noqa: F811
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker told to stop while a job runs drains; past the grace (shortened here from
    30 s) it is told again and hands the job back to the queue; nothing of it is left."""
    import sys
    import time

    from jobfleet.fleet import LaunchSpec, ssh
    from jobfleet.store import open_store

    monkeypatch.setattr(ssh, "TERMINATE_GRACE", 1.0)
    store = tmp_path / "jobfleet.db"
    run = submit(str(store), [f"sleep {marker}"], tmp_path)
    provider = make(providers, fleet, ssh_hosts[:1], install="never", python=sys.executable)
    spec = LaunchSpec(fleet=fleet, run_id=run,
                      env={"JOBFLEET_STORE": str(store), "JOBFLEET_BLOBS": str(tmp_path / "b")})
    [machine] = provider.launch(1, spec)
    wait_for(lambda: pids_with(marker), 60, interval=0.1, what="the job to start")

    started = time.monotonic()
    provider.terminate([machine.id])
    assert time.monotonic() - started < 20
    assert pids_with(marker) == [] and pids_with(f"--id {fleet}-") == []
    with open_store(store) as db:
        [job] = db.jobs(run)
        assert job.state == "queued", job
    assert [m.phase for m in provider.list()] == ["stopped"]


def test_unreachable_hosts_refused_keys_and_missing_python_are_reasons_not_errors(
        ssh_hosts: list[SshHost], fleet: str, providers: list[Any],  # noqa: F811
        tmp_path: Path) -> None:
    import subprocess

    from jobfleet.fleet import LaunchSpec

    host = ssh_hosts[0]
    spec = LaunchSpec(fleet=fleet, run_id=None, env={"JOBFLEET_STORE": str(tmp_path / "db")})

    def outcome(provider: Any) -> Any:
        machine = provider.launch(1, spec)[0]
        wait_for(lambda: provider.recorder.phases(machine.id)[-1:] == ["failed"], 60,
                 interval=0.1, what=f"{machine.id} to fail")
        return provider.recorder.last(machine.id)

    # nothing listens there
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.4", 0))
        closed = s.getsockname()[1]
    nowhere = make(providers, fleet, ssh_hosts, bootstrap_attempts=1,
                   hosts=f"{host.user}@127.0.0.4:{closed}", known_hosts="ignore")
    failed = outcome(nowhere)
    assert failed.reason.startswith("unreachable: 127.0.0.4"), failed.reason
    [listed] = nowhere.list()
    assert listed.phase == "failed" and listed.reason.startswith("unreachable:"), listed

    # a key the host does not know
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, capture_output=True)
    refused = outcome(make(providers, fleet, [host], bootstrap_attempts=1,
                           ssh_key=str(stranger)))
    assert refused.reason.startswith("key refused"), refused.reason

    # a host key that is not the host's
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{host.address}]:{host.port} {Path(f'{stranger}.pub').read_text()}")
    untrusted = outcome(make(providers, fleet, [host], bootstrap_attempts=1,
                             known_hosts=str(wrong)))
    assert "not trusted" in untrusted.reason, untrusted.reason

    # no such interpreter on the host: said before anything is installed
    no_python = outcome(make(providers, fleet, [host], bootstrap_attempts=1,
                             python="python3.99"))
    assert no_python.reason.startswith("no python3.99 on the host"), no_python.reason
    assert no_python.host == host.entry


def test_fleet_up_status_down_by_hand_show_phases_and_the_setup_log(
        ssh_hosts: list[SshHost], fleet: str, jf: Jobfleet, tmp_path: Path) -> None:  # noqa: F811
    """`fleet up` returns with its workers bootstrapped (a process that launches and exits
    still starts them); `fleet status` shows each with its phase, a failed one with its reason
    and setup log; `fleet down` stops them and finds nothing live afterwards."""
    from pg import fresh_database, require_server

    (tmp_path / "setup.sh").write_text(SETUP)
    (tmp_path / "jobfleet.toml").write_text(
        "[providers.ssh]\n"
        f"known_hosts = {json.dumps(_known_hosts(ssh_hosts))}\n"
        'setup = "setup.sh"\n'
        "bootstrap_attempts = 1\n")
    flags = ["--provider", "ssh", "--hosts", ",".join(h.entry for h in ssh_hosts),
             "--ssh-key", str(ssh_hosts[0].key), "--fleet", fleet]
    with fresh_database(require_server()) as url:
        jf.env["JOBFLEET_STORE"] = url
        up = jf("fleet", "up", "2", *flags, timeout=FIRST_BOOTSTRAP, check=0)
        assert up.stdout.count(": launching") == 2, up.stdout
        status = jf.json("fleet", "status", *flags)
        by_host = {m["host"]: m for m in status["machines"]}
        good, bad = (by_host[h.entry] for h in ssh_hosts)
        assert good["phase"] == "ready", good
        assert good["worker"].startswith(f"{fleet}-")
        assert bad["phase"] == "failed", bad
        assert bad["reason"].startswith("the setup script setup.sh exited 1"), bad
        assert "nvidia-smi: command not found" in bad["log_tail"], bad
        text = jf("fleet", "status", *flags, check=0).stdout
        assert f"fleet {fleet} (ssh): 1 live, 2 in all" in text, text
        assert "nvidia-smi: command not found" in text, text
        assert len(pids_with(f"--id {fleet}-")) == 1

        down = jf("fleet", "down", *flags, check=0)
        assert "listed again, nothing is left" in down.stdout, down.stdout
        assert pids_with(f"--id {fleet}-") == []
        after = {m["host"]: m["phase"] for m in jf.json("fleet", "status", *flags)["machines"]}
        assert after == {ssh_hosts[0].entry: "stopped", ssh_hosts[1].entry: "failed"}, after


def test_run_with_the_ssh_provider_runs_300_jobs_and_leaves_nothing(
        ssh_hosts: list[SshHost], fleet: str, jf: Jobfleet,  # noqa: F811
        pg_with_password: tuple[str, str], tmp_path: Path) -> None:
    """`jobfleet run jobs.csv --provider ssh --hosts ... --ssh-key ...`: the workers are
    bootstrapped on both hosts, serve a PostgreSQL store (its password never on a command
    line), run the 300 jobs; the fleet is taken down at the end and `fleet status` finds
    nothing left."""
    url, password = pg_with_password
    jf.env["JOBFLEET_STORE"] = url
    (tmp_path / "jobfleet.toml").write_text(
        "[providers.ssh]\n"
        f"known_hosts = {json.dumps(_known_hosts(ssh_hosts))}\n"
        "workers_per_host = 2\n")
    write_csv(tmp_path / "jobs.csv", ["command"], [[f"echo job {i}"] for i in range(1, 301)])
    hosts = ",".join(h.entry for h in ssh_hosts)
    fleet_flags = ["--provider", "ssh", "--hosts", hosts, "--ssh-key", str(ssh_hosts[0].key),
                   "--fleet", fleet]
    watch = CommandLineWatch(password)

    done = jf("run", "jobs.csv", *fleet_flags, "--max-workers", "4", "--slots", "2",
              timeout=FIRST_BOOTSTRAP, check=0)
    assert "300 succeeded" in done.stdout, done.stdout
    assert "listed again, nothing is left" in done.stdout, done.stdout

    run = jf.json("runs")[0]["run"]
    workers = {j["worker"] for j in jf.jobs(run).values()}
    assert len(workers) >= 2 and all(w.startswith(f"{fleet}-") for w in workers), workers
    hosts_used = {line.split("=", 1)[1] for w in workers
                  for line in (FLEETS / fleet / f"{w}.state").read_text().splitlines()
                  if line.startswith("host=")}
    assert hosts_used == {h.entry for h in ssh_hosts}, hosts_used
    assert pids_with(f"--id {fleet}-") == []

    status = jf.json("fleet", "status", *fleet_flags)
    assert [m for m in status["machines"] if m["phase"] in ("launching", "bootstrapping",
                                                            "ready")] == [], status
    assert status["provider"]["hosts"] == [h.entry for h in ssh_hosts]
    text = jf("fleet", "status", *fleet_flags, check=0).stdout
    assert f"fleet {fleet} (ssh): 0 live" in text, text
    assert watch.stop() == []
