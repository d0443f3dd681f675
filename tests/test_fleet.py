"""Many machines: workers in network namespaces of their own, sharing nothing but a PostgreSQL
URL and an S3 URL, finish a run while one of them is killed and the database restarts.

The "hosts" are network namespaces this test creates (veth pairs on a bridge of its own, a
private 10.231.N.0/24 subnet on this machine). PostgreSQL is a throwaway cluster of the test's
own (initdb/pg_ctl), so restarting it disturbs nothing else. S3 is moto's S3 emulator, because
no real S3 runs here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for, write_csv
from pg import Cluster, free_port

JOBS = 2000


def _ip(*args: str, ns: str | None = None) -> None:
    command = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class Hosts:
    """Network namespaces on a bridge: the host side is SUBNET.1, namespace i is SUBNET.(i+2)."""

    def __init__(self, count: int) -> None:
        tag = secrets.token_hex(3)
        self.subnet = f"10.231.{secrets.randbelow(250) + 1}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"jfbr{tag}"
        self.names = [f"jf{tag}h{i}" for i in range(count)]
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            outside, inside = f"jf{tag}o{i}", f"jf{tag}i{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("addr", "add", f"{self.subnet}.{i + 2}/24", "dev", inside, ns=ns)
            _ip("link", "set", inside, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def destroy(self) -> None:
        for ns in self.names:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)  # takes its end of the veth pair, and so the pair
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        reason = "network namespaces need root and iproute2"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    made = Hosts(2)
    try:
        yield made
    finally:
        made.destroy()


class BridgedCluster(Cluster):
    """The test's own PostgreSQL, also listening on the bridge and trusting its subnet."""

    def __init__(self, where: Path, hosts: Hosts) -> None:
        super().__init__(where)
        self.hosts = hosts
        with open(self.data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {hosts.subnet}.0/24 trust\n")

    def start(self) -> None:
        listen = f"127.0.0.1,{self.hosts.gateway}"
        options = f"-p {self.port} -k {self.root} -c listen_addresses={listen} -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", options)

    @property
    def fleet_url(self) -> str:
        """The URL as the other hosts reach it."""
        return f"postgresql://postgres@{self.hosts.gateway}:{self.port}/postgres"


@pytest.fixture
def moto_on_bridge(hosts: Hosts, tmp_path: Path) -> Iterator[str]:
    """moto's S3 emulator on the bridge address, where every namespace reaches it."""
    pytest.importorskip("moto.server")
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", hosts.gateway,
                             "-p", str(port)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        endpoint = f"http://{hosts.gateway}:{port}"
        import socket

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex((hosts.gateway, port)) == 0

        wait_for(lambda: proc.poll() is not None or listening(), 30, what="moto to listen")
        assert proc.poll() is None, (tmp_path / "moto.log").read_text()
        yield endpoint
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_a_fleet_in_two_namespaces_survives_a_killed_worker_and_a_database_restart(
        hosts: Hosts, moto_on_bridge: str, jf: Jobfleet, tmp_path: Path) -> None:
    import boto3

    cluster = BridgedCluster(tmp_path, hosts)
    cluster.start()
    try:
        _run_fleet(hosts, cluster, moto_on_bridge, jf, tmp_path, boto3)
    finally:
        cluster.destroy()


def _run_fleet(hosts: Hosts, cluster: BridgedCluster, endpoint: str, jf: Jobfleet,
               tmp_path: Path, boto3: object) -> None:
    aws = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    bucket = f"fleet-{secrets.token_hex(3)}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",  # type: ignore[attr-defined]
                 aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    blobs = f"s3://{bucket}/fleet"
    # only the two URLs (and S3 credentials in the environment) travel to the other hosts
    fleet_env = {**{k: v for k, v in jf.env.items() if not k.startswith("JOBFLEET_")}, **aws,
                 "JOBFLEET_STORE": cluster.fleet_url, "JOBFLEET_BLOBS": blobs}
    jf.env.update(aws, JOBFLEET_STORE=cluster.url, JOBFLEET_BLOBS=blobs)

    write_csv(tmp_path / "jobs.csv", ["command", "max_attempts"],
              [[f"sleep 0.02; echo job {i}", 3] for i in range(1, JOBS + 1)])
    run = jf.submit("jobs.csv")

    workers = []
    for ns in (hosts.names[0], hosts.names[0], hosts.names[1]):
        workers.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "jobfleet", "worker",
             "--slots", "2", "--lease-seconds", "3", "--idle-exit", "5"],
            env=fleet_env, cwd=tmp_path, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        from jobfleet.store import open_store

        with open_store(cluster.url) as db:
            def succeeded() -> int:
                return db.counts(run)["succeeded"]

            wait_for(lambda: succeeded() >= 300, 120, interval=0.1, what="300 jobs to succeed")
            workers[0].send_signal(signal.SIGKILL)  # one worker dies with jobs in hand
            wait_for(lambda: succeeded() >= 900, 120, interval=0.1, what="900 jobs to succeed")
            cluster.restart()  # every connection is cut
            restarted_at = time.time()
            wait_for(lambda: succeeded() == JOBS, 240, interval=0.5, what="every job to succeed")

            counts = db.counts(run)
            assert counts["succeeded"] == JOBS, counts
            jobs = db.jobs(run)
            # recorded once: one successful attempt per job, and nothing after it
            for job in jobs:
                attempts = db.attempts(job.key)
                assert [a.state for a in attempts].count("succeeded") == 1, (job.id, attempts)
                assert attempts[-1].state == "succeeded", (job.id, attempts)
            lost = [j for j in jobs if any(a.state == "lost" for a in db.attempts(j.key))]
            assert lost, "the killed worker held no job: it was killed too late to matter"
            done_by = {w.id: w.jobs_done for w in db.workers()}
            assert sum(1 for n in done_by.values() if n > 0) >= 2, done_by
            assert any(e.at > restarted_at for e in db.events(run_id=run)), \
                "nothing was recorded after the restart"

        # every log is in the bucket and readable from here, as from any host
        for seq in (1, 777, JOBS):
            assert jf("logs", f"{run}-{seq}", check=0).stdout == f"job {seq}\n"
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.communicate(timeout=30)
