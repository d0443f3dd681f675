"""The worker gateway end to end: `jobfleet server` in front of a store, workers and clients
that hold only a token, what each token is refused (and why), TLS with a CA of our own, a
server restarted under a busy worker, and a fleet provider starting gateway workers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for, write_csv
from gateway_server import ProcessServer, ThreadServer, make_ca, make_token
from jobfleet.errors import NotFound
from jobfleet.gateway import connect, wire
from jobfleet.gateway.client import AccessDenied
from jobfleet.gateway.server import create_server
from jobfleet.spec import JobSpec
from jobfleet.store import Capacity, NewRun, Outcome, Store, WorkerInfo, open_store

BIG = Capacity(8, 8, 10**10)


class Gateway:
    """A server (in a thread) in front of jf's store and blobs, and tokens for it."""

    def __init__(self, jf: Jobfleet, **server: object) -> None:
        self.jf = jf
        self.store_path = str(jf.store_path)
        open_store(self.store_path).close()  # made and migrated
        app = create_server(self.store_path, str(jf.blobs), dashboard=False)
        self.server = ThreadServer(app, **server)  # type: ignore[arg-type]
        self.url = self.server.url

    def token(self, role: str, run_id: str | None = None) -> str:
        return make_token(self.store_path, role, run_id)

    def token_file(self, role: str, run_id: str | None = None) -> Path:
        path = self.jf.cwd / f"{role}-{run_id or 'any'}-{time.monotonic_ns()}.token"
        path.write_text(self.token(role, run_id) + "\n")
        return path

    def as_(self, role: str, run_id: str | None = None, **kw: object) -> Store:
        store, _ = connect(self.url, token=self.token(role, run_id), retry_for=5, **kw)  # type: ignore[arg-type]
        return store

    def env(self, **extra: str) -> dict[str, str]:
        """A worker's environment: no store or blobs, only what it is given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLEET_")}
        return {**env, "PYTHONUNBUFFERED": "1", **extra}

    def worker(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobfleet", "worker", "--server", self.url, *args],
            cwd=self.jf.cwd, env=env or self.env(), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def gw(jf: Jobfleet) -> Iterator[Gateway]:
    g = Gateway(jf)
    yield g
    g.server.stop()


def test_a_worker_with_only_a_token_runs_jobs_logs_and_outputs(jf: Jobfleet, gw: Gateway) -> None:
    write_csv(jf.cwd / "jobs.csv", ["command", "outputs", "max_attempts"], [
        ["echo hello from {x}; mkdir -p out; echo result > out/a.txt;"
         " head -c 3000000 /dev/urandom > out/big.bin", "out/*", 1],
        ["echo broken >&2; exit 3", "", 1],
        ["env", "", 1],
    ])
    (jf.cwd / "jobs.csv").write_text((jf.cwd / "jobs.csv").read_text().replace("{x}", "gw"))
    run = jf.submit("jobs.csv")
    token = gw.token("worker")
    done = gw.worker("--run", run, "--idle-exit", "1", "--slots", "2", "--inherit-env",
                     env=gw.env(JOBFLEET_TOKEN=token))
    assert done.returncode == 0, done.stderr
    assert "2 failed" not in done.stdout and "1 failed, 2 succeeded" in done.stdout
    jobs = jf.jobs(run)
    assert [jobs[f"{run}-{i}"]["state"] for i in (1, 2, 3)] == ["succeeded", "failed", "succeeded"]
    assert jobs[f"{run}-2"]["reason"] == "exit code 3"
    # logs and outputs reached the server's blob store, as with a worker of the store itself
    assert jf.log(run, 1) == "hello from gw\n" and jf.log(run, 2) == "broken\n"
    outputs = jf.blobs / "outputs" / run / "1" / "out"
    assert (outputs / "a.txt").read_text() == "result\n"
    assert (outputs / "big.bin").stat().st_size == 3_000_000
    logs = jf("logs", f"{run}-2", check=0).stdout
    assert "broken" in logs
    # the job saw the worker's environment (--inherit-env) but never its token
    env = jf.log(run, 3)
    assert "PATH=" in env and token not in env and "JOBFLEET_TOKEN" not in env


def test_python_calls_run_on_a_gateway_worker(jf: Jobfleet, gw: Gateway) -> None:
    """Calls whose arguments and results are too big for the store travel through the
    server's blob store: the worker reads the function and arguments of the calls it holds,
    and stores their results."""
    script = jf.cwd / "submit.py"
    script.write_text(textwrap.dedent("""
        import jobfleet
        def grow(n):
            return b"x" * n + bytes(100_000)
        run = jobfleet.submit_map(grow, [10, 200_000, 3], workers=0)
        print(run.id)
    """))
    p = subprocess.run([sys.executable, str(script)], cwd=jf.cwd, env=jf.env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.split()[-1]
    done = gw.worker("--run", run_id, "--idle-exit", "1",
                     "--token-file", str(gw.token_file("worker", run_id)))
    assert done.returncode == 0, done.stderr
    import jobfleet

    results = jobfleet.attach(run_id, store=str(jf.store_path), blobs=str(jf.blobs)).results()
    assert [len(r) for r in results] == [100_010, 300_000, 100_003]


def test_a_client_follows_a_log_and_fetches_outputs_through_the_server(
        jf: Jobfleet, gw: Gateway, tmp_path: Path) -> None:
    """A remote client (a client token, no store) submits, reads a running job's log as it
    grows, then the job's outputs; another client is refused them."""
    write_csv(jf.cwd / "jobs.csv", ["command", "outputs"], [
        ["for i in 1 2 3 4 5 6; do echo line $i; sleep 0.4; done; mkdir -p out;"
         " echo done > out/r.txt", "out/r.txt"]])
    client = {"JOBFLEET_TOKEN_FILE": str(gw.token_file("client"))}
    run = str(jf.json("submit", "jobs.csv", "--store", gw.url, env=client)["run"])
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jobfleet", "worker", "--server", gw.url, "--idle-exit", "1",
             "--token-file", str(gw.token_file("worker")), "--run", run],
            cwd=jf.cwd, env=gw.env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        def partial() -> str | None:
            text = jf("logs", f"{run}-1", "--store", gw.url, env=client).stdout  # or not started
            return text if "line 2" in text else None

        early = wait_for(partial, 30, what="the log to grow while the job runs")
        assert "line 6" not in early  # read while it ran, not at the end
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert jf("logs", f"{run}-1", "--store", gw.url, env=client, check=0).stdout == "".join(
        f"line {i}\n" for i in range(1, 7))  # each chunk stored once, in order
    jf("results", run, "--to", str(tmp_path / "got"), "--store", gw.url, env=client, check=0)
    assert (tmp_path / "got" / "1" / "out" / "r.txt").read_text() == "done\n"
    other = {"JOBFLEET_TOKEN_FILE": str(gw.token_file("client"))}
    p = jf("logs", f"{run}-1", "--store", gw.url, env=other)
    assert p.returncode == 2 and f"no run '{run}'" in p.stderr  # it does not even see it
    assert "a client token sees only the runs it submitted" in p.stderr


# -- refusals ---------------------------------------------------------------------------------

def _run(store: Store, n: int = 2, **fields: object) -> str:
    return store.submit(NewRun(source="test"), [JobSpec("true", **fields)  # type: ignore[arg-type]
                                                for _ in range(n)])


def _info(worker_id: str) -> WorkerInfo:
    now = time.time()
    return WorkerInfo(worker_id, "host", 1, 1, 1.0, 2**30, 0, 60.0, None, "running", now, now, 0)


def test_a_worker_token_cannot_submit_jobs(jf: Jobfleet, gw: Gateway) -> None:
    worker = gw.as_("worker")
    with pytest.raises(AccessDenied, match="a worker token cannot submit jobs") as e:
        _run(worker)
    assert "client token" in (e.value.hint or "")
    with pytest.raises(AccessDenied, match="cannot submit jobs"):
        worker.append(_run(gw.as_("admin")), [JobSpec("true")])
    # and from the command line, as a user would meet it
    write_csv(jf.cwd / "jobs.csv", ["command"], [["true"]])
    p = jf("submit", "jobs.csv", "--store", gw.url,
           env={"JOBFLEET_TOKEN_FILE": str(gw.token_file("worker"))})
    assert p.returncode == 1
    assert "refused: a worker token cannot submit jobs" in p.stderr
    assert open_store(gw.store_path).runs(limit=10) == [r for r in gw.as_("admin").runs()
                                                        if r.source != "jobs.csv"]


def test_a_worker_token_cannot_read_any_runs_results(gw: Gateway) -> None:
    client = gw.as_("client")
    mine = _run(client, 1)
    worker = gw.as_("worker")
    worker.register_worker(_info("w1"))
    (x,) = worker.lease("w1", BIG, 60)
    assert worker.finish("w1", [Outcome(x.key, x.token, "succeeded", exit_code=0,
                                        result=b"Isecret")]) == []
    # the client reads its result; the worker that produced it cannot, nor anything else
    assert [e.result for e in client.ended(mine)] == [b"Isecret"]
    for read in (lambda: worker.ended(mine), lambda: worker.jobs(mine),
                 lambda: worker.counts(mine), lambda: worker.events(mine)):
        with pytest.raises(AccessDenied, match=f"a worker token cannot read run {mine}"):
            read()
    with pytest.raises(AccessDenied, match="cannot list runs"):
        worker.runs()
    with pytest.raises(AccessDenied, match="cannot list the workers"):
        worker.workers()
    _, blobs = connect(gw.url, token=gw.token("worker"))
    with pytest.raises(AccessDenied, match=f"cannot read results/{mine}/1-1.pkl"):
        blobs.read(f"results/{mine}/1-1.pkl")
    with pytest.raises(AccessDenied, match=f"cannot read payloads/{mine}/1.pkl"):
        blobs.read(f"payloads/{mine}/1.pkl")


def test_a_worker_reports_and_stores_only_for_its_own_leases(gw: Gateway) -> None:
    run_id = _run(gw.as_("admin"), 2)
    first, second = gw.as_("worker"), gw.as_("worker")  # two tokens
    first.register_worker(_info("w1"))
    second.register_worker(_info("w2"))
    (x,) = first.lease("w1", Capacity(1, 1, 2**30), 60)
    # another token cannot take over w1, report for it or store its job's outputs
    with pytest.raises(AccessDenied, match="worker w1 belongs to another token"):
        second.register_worker(_info("w1"))
    with pytest.raises(AccessDenied, match="worker w1 belongs to another token"):
        second.heartbeat("w1", [(x.key, x.token)], 60)
    with pytest.raises(AccessDenied, match="has not registered with this token"):
        second.lease("w9", BIG, 60)
    open_store(gw.store_path).register_worker(_info("direct"))  # a worker of the store itself
    with pytest.raises(AccessDenied, match="worker direct is running, connected to the store"):
        second.register_worker(_info("direct"))
    _, second_blobs = connect(gw.url, token=gw.token("worker"))
    with pytest.raises(AccessDenied, match=f"job {run_id}-1 is not running on a worker of this"):
        second_blobs.put(f"outputs/{run_id}/1/a.txt", b"forged")
    with pytest.raises(AccessDenied, match="is not running on a worker of this token"):
        second_blobs.put(f"results/{run_id}/1-1.pkl", b"forged")
    # a lease token another worker saw is still fenced: its outcome is stale
    (y,) = second.lease("w2", BIG, 60)
    assert second.finish("w2", [Outcome(x.key, x.token, "failed")]) == [x.key]
    assert first.finish("w1", [Outcome(x.key, x.token, "succeeded", exit_code=0)]) == []
    assert second.finish("w2", [Outcome(y.key, y.token, "succeeded", exit_code=0)]) == []
    assert gw.as_("admin").counts(run_id)["succeeded"] == 2


def test_a_worker_token_for_one_run_leases_only_from_it(gw: Gateway) -> None:
    admin = gw.as_("admin")
    other, mine = _run(admin, 3), _run(admin, 2)
    worker = gw.as_("worker", mine)
    worker.register_worker(_info("w1"))
    with pytest.raises(AccessDenied, match=f"serves run {mine} only, not run {other}"):
        worker.lease("w1", BIG, 60, run_id=other)
    assert {x.run_id for x in worker.lease("w1", BIG, 60)} == {mine}
    assert worker.run(mine[:4]).id == mine  # `worker --run PREFIX` finds it
    with pytest.raises(NotFound):  # it sees no other run
        worker.run(other)


def test_a_client_reads_and_acts_on_its_own_runs_only(gw: Gateway) -> None:
    alice, bob = gw.as_("client"), gw.as_("client")
    hers = _run(alice, 2)
    his = _run(bob, 1)
    assert [r.id for r in alice.runs()] == [hers] and [r.id for r in bob.runs()] == [his]
    assert alice.counts(hers)["queued"] == 2 and alice.run("latest").id == hers
    for act in (lambda: alice.jobs(his), lambda: alice.ended(his), lambda: alice.cancel(his),
                lambda: alice.retry(his), lambda: alice.append(his, [JobSpec("true")])):
        with pytest.raises(AccessDenied, match=f"run {his} was not submitted with this token"):
            act()
    with pytest.raises(AccessDenied, match="a client token cannot do a worker.s work"):
        alice.lease("w1", BIG, 60)
    assert alice.workers() == []  # the fleet (none here) is no secret to a client
    assert alice.cancel(hers) == (2, 0)


def test_no_token_a_wrong_one_and_a_revoked_one_are_refused(jf: Jobfleet, gw: Gateway) -> None:
    import httpx

    answer = httpx.post(f"{gw.url}/v1/worker/lease", json={})
    assert answer.status_code == 401 and "carries no token" in answer.json()["detail"]
    with pytest.raises(AccessDenied, match="not known to this server, or was revoked"):
        connect(gw.url, token="jfw_" + "x" * 43)[0].runs()
    client = gw.as_("client")
    client.runs()
    [token_id] = [line.split()[0] for line in jf("token", "list", check=0).stdout.splitlines()
                  if " client " in line]
    assert "revoked" in jf("token", "revoke", token_id, check=0).stdout
    wait_for(lambda: _refused(client), 10, what="the revoked token to be refused")


def _refused(store: Store) -> bool:
    try:
        store.runs()
    except AccessDenied:
        return True
    return False


# -- TLS --------------------------------------------------------------------------------------

def test_tls_with_a_private_ca(jf: Jobfleet, tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    g = Gateway(jf, cert=cert, key=key)
    try:
        assert g.url.startswith("https://")
        # not trusted by default, with a message that says what to do
        with pytest.raises(Exception, match="does not trust the server's certificate") as e:
            g.as_("admin").runs()
        assert "--ca-file" in str(e.value)
        run_id = _run(g.as_("admin", ca_file=str(ca)), 2)
        done = g.worker("--run", run_id, "--idle-exit", "1", "--ca-file", str(ca),
                        "--token-file", str(g.token_file("worker")))
        assert done.returncode == 0 and "2 succeeded" in done.stdout, done.stderr
        # SSL_CERT_FILE works too (for every tool on the machine, not only jobfleet)
        p = jf("status", run_id, "--store", g.url, "--json",
               env={"SSL_CERT_FILE": str(ca), "JOBFLEET_TOKEN_FILE": str(g.token_file("admin"))})
        assert p.returncode == 0, p.stderr
        assert '"succeeded": 2' in p.stdout
    finally:
        g.server.stop()


# -- a server restarted mid-run ---------------------------------------------------------------

def test_a_worker_rides_out_server_restarts_without_loss_or_duplicates(
        jf: Jobfleet, tmp_path: Path) -> None:
    """2,000 jobs through a gateway worker while the server is killed (-9) and restarted,
    then stopped gracefully and restarted: every job succeeds once, with one attempt."""
    store_path = str(jf.store_path)
    db = open_store(store_path)
    run_id = db.submit(NewRun(source="restart"), [JobSpec("true") for _ in range(2000)])
    server = ProcessServer(store_path, str(jf.blobs), tmp_path / "server.log")
    server.start()
    token = tmp_path / "worker.token"
    token.write_text(make_token(store_path, "worker"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLEET_")}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jobfleet", "worker", "--server", server.url, "--token-file",
             str(token), "--run", run_id, "--slots", "2", "--idle-exit", "10"],
            cwd=jf.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def done() -> int:
            return db.counts(run_id)["succeeded"]

        wait_for(lambda: done() >= 400, 120, what="400 jobs done")
        server.kill(signal.SIGKILL)
        time.sleep(0.5)  # the worker finds the server gone
        server.start()
        wait_for(lambda: done() >= 1200, 120, what="1,200 jobs done")
        server.kill(signal.SIGTERM)
        server.start()
        wait_for(lambda: done() == 2000, 120, what="every job done")
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        server.kill()
    counts = db.counts(run_id)
    assert counts["succeeded"] == 2000 and sum(counts.values()) == 2000
    assert {j.attempts for j in db.jobs(run_id)} == {1}
    with sqlite3.connect(store_path) as c:
        assert c.execute("SELECT count(*), count(DISTINCT job_id) FROM attempts").fetchone() \
            == (2000, 2000)
    text = (tmp_path / "worker.log").read_text()
    assert "retrying" in text and "2000 succeeded" in text


# -- fleets -----------------------------------------------------------------------------------

def test_the_local_provider_starts_workers_that_hold_only_a_token(
        jf: Jobfleet, gw: Gateway, tmp_path: Path) -> None:
    from jobfleet.fleet.base import LaunchSpec
    from jobfleet.fleet.local import LocalProvider

    run_id = _run(gw.as_("admin"), 4)
    provider = LocalProvider(f"gw{os.getpid()}", {"state_dir": str(tmp_path / "fleets")})
    spec = LaunchSpec(fleet=provider.fleet, run_id=run_id, slots=2, idle_exit=2,
                      env={"JOBFLEET_STORE": str(jf.store_path), "JOBFLEET_BLOBS": str(jf.blobs)},
                      server=gw.url, token=gw.token("worker", run_id))
    os.environ["PGPASSWORD"] = "not-for-workers"
    try:
        [machine] = provider.launch(1, spec)
        pid = int((provider.dir / f"{machine.id}.pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {e.partition(b"=")[0].decode() for e in environ}
        assert "JOBFLEET_SERVER" in names and "JOBFLEET_TOKEN" in names
        assert not names & {"JOBFLEET_STORE", "JOBFLEET_BLOBS", "PGPASSWORD"}
        db = open_store(jf.store_path)
        wait_for(lambda: db.counts(run_id)["succeeded"] == 4, 60, what="the run done")
        assert {w.id for w in db.workers()} >= {machine.id}
    finally:
        del os.environ["PGPASSWORD"]
        provider.terminate([m.id for m in provider.list()])
    assert [m for m in provider.list() if m.phase != "stopped"] == []


def test_run_on_a_fleet_in_gateway_mode_gives_workers_only_a_worker_token(
        jf: Jobfleet, gw: Gateway, tmp_path: Path) -> None:
    """`[fleet] server` and `worker_token_file`: `jobfleet run --provider local` keeps the
    store to itself and starts workers that speak only to the server."""
    token = gw.token_file("worker")
    fleet = f"gwrun{os.getpid()}"
    (tmp_path / "jobfleet.toml").write_text(
        f'[fleet]\nname = "{fleet}"\nserver = "{gw.url}"\nworker_token_file = "{token}"\n'
        f'max_workers = 2\n[providers.local]\nstate_dir = "{tmp_path / "fleets"}"\n')
    write_csv(tmp_path / "jobs.csv", ["command"], [["env"]] + [["sleep 0.2"]] * 7)
    p = jf("run", "jobs.csv", "--provider", "local", timeout=120, check=0)
    assert "8 succeeded" in p.stdout and "nothing is left" in p.stdout
    run = jf.json("runs")[0]["run"]
    seen = jf.log(run, 1)
    assert "JOBFLEET_SERVER" not in seen and "JOBFLEET_TOKEN" not in seen  # jobs see neither
    log = next((tmp_path / "fleets" / fleet).glob("*.log")).read_text()
    assert str(jf.store_path) not in log and gw.url in log
    workers = {w["worker"] for w in jf.json("workers")}
    assert any(w.startswith(fleet) for w in workers)

    (tmp_path / "jobfleet.toml").write_text(f'[fleet]\nserver = "{gw.url}"\n')
    p = jf("run", "jobs.csv", "--provider", "local", check=2)
    assert "worker_token_file is not" in p.stderr


def test_a_resent_append_is_done_once_and_a_new_one_always(jf: Jobfleet, gw: Gateway) -> None:
    """An append resent after a lost answer is found by its request id; an append whose first
    try never landed is made, even when the run already ends with the same jobs."""
    import http.client
    import json as jsonlib
    from urllib.parse import urlsplit

    admin = gw.as_("admin")
    run_id = admin.submit(NewRun(), [JobSpec("true")] * 2)
    token = gw.token("admin")
    url = urlsplit(gw.url)

    def post(request_id: str) -> int:
        c = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        c.request("POST", f"/v1/client/runs/{run_id}/jobs",
                  body=jsonlib.dumps({"jobs": [JobSpec("true").to_json()] * 2,
                                      "request": request_id}),
                  headers={"Authorization": f"Bearer {token}", wire.RETRY_HEADER: "1",
                           "Content-Type": "application/json"})
        answer = jsonlib.loads(c.getresponse().read())
        return int(answer["first"])

    assert post("first-try-lost") == 3  # never landed before: appended, though the tail matches
    assert post("first-try-lost") == 3  # its answer lost: found, not appended again
    assert post("another") == 5
    assert admin.run(run_id).total == 6
