"""Security: the dashboard's actions need its token and it serves nothing outside the blob
store; secrets (a `secret:` value, the store's password) stay out of logs, events, `ps` and the
dashboard; a job cannot read another job's workspace (bwrap).

The dashboard here is a real `jobfleet dashboard` process on 127.0.0.1, spoken to over HTTP
(http.client, which sends a path as written: `..` and all).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import Jobfleet, wait_for, write_csv
from pg import free_port, fresh_database, require_server

pytest.importorskip("fastapi", reason="the dashboard extra is not installed")


class Dashboard:
    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token

    def request(self, method: str, path: str, headers: dict[str, str] | None = None
                ) -> tuple[int, bytes]:
        with closing(http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)) as c:
            c.request(method, path, headers=headers or {})
            answer = c.getresponse()
            return answer.status, answer.read()

    def listening(self) -> bool:
        try:
            return self.request("GET", "/api/runs")[0] == 200
        except OSError:
            return False


@pytest.fixture
def dashboard(jf: Jobfleet) -> Iterator[Dashboard]:
    token = secrets.token_urlsafe(24)
    port = free_port()
    proc = jf.popen("dashboard", "--port", str(port), env={"JOBFLEET_DASHBOARD_TOKEN": token})
    board = Dashboard(port, token)
    wait_for(lambda: proc.poll() is not None or board.listening(), 30, what="the dashboard")
    assert proc.poll() is None, proc.communicate()
    yield board
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert token not in out + err  # it was given, not made: never printed


def snapshot(db: Path) -> tuple[list[Any], list[Any]]:
    with closing(sqlite3.connect(db)) as c:
        return (c.execute("SELECT * FROM runs ORDER BY id").fetchall(),
                c.execute("SELECT * FROM jobs ORDER BY id").fetchall())


# --- the dashboard ---------------------------------------------------------------------------


def test_actions_need_the_token(jf: Jobfleet, dashboard: Dashboard) -> None:
    failed = jf.submit("--each", "exit 3", "a")
    jf("worker", "--idle-exit", "0.3", check=0)
    queued = jf.submit("--each", "echo {}", "b", "c")
    before = snapshot(jf.store_path)
    cookie = f"jobfleet_token_{dashboard.port}={dashboard.token}"
    refused = [{}, {"X-Jobfleet-Token": "wrong"}, {"Authorization": "Bearer wrong"},
               {"Authorization": f"Basic {dashboard.token}"}, {"Cookie": cookie},
               {"X-Jobfleet-Token": ""}]
    actions = [("POST", f"/api/runs/{queued}/cancel"), ("POST", f"/api/jobs/{queued}-1/cancel"),
               ("POST", f"/api/runs/{failed}/retry"), ("POST", f"/api/jobs/{failed}-1/retry")]
    for method, path in actions:
        for headers in refused:
            status, body = dashboard.request(method, path, headers)
            assert status == 401, (path, headers, status, body)
        # a token in the address (a link another site could make) authorizes no change
        status, _ = dashboard.request(method, f"{path}?token={dashboard.token}")
        assert status == 401, path
        # and reads do not change things: GET on an action is not allowed
        assert dashboard.request("GET", path)[0] in (404, 405)
    assert snapshot(jf.store_path) == before
    # with the token, the same request works: the refusals above were about the token
    status, body = dashboard.request("POST", f"/api/runs/{queued}/cancel",
                                     {"X-Jobfleet-Token": dashboard.token})
    assert status == 200 and json.loads(body)["cancelled"] == 2
    status, body = dashboard.request("POST", f"/api/jobs/{failed}-1/retry",
                                     {"Authorization": f"Bearer {dashboard.token}"})
    assert status == 200 and json.loads(body)["queued"] == 1


TRAVERSALS = [
    "/static/../../../../etc/passwd", "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static//etc/passwd",
    "/static/..\\..\\..\\etc\\passwd", "/static/../app.py", "/static/%2e%2e/app.py",
    "/api/jobs/../../../etc/passwd/log", "/api/jobs/..%2f..%2fetc%2fpasswd/log",
    "/api/jobs/{run}-1/log?attempt=0", "/api/jobs/{run}-1/log?attempt=-1",
    "/api/jobs/{run}-1%2f..%2f..%2f..%2fjobfleet.db/log", "/api/jobs/{run}-1/../../../etc/passwd",
    "/jobs/..%2f..%2fstate%2fjobfleet.db", "/runs/{run}/../../../etc/passwd",
    "/api/runs/{run}%00/jobs", "/%2e%2e/%2e%2e/etc/passwd", "/../../../../etc/passwd",
]


def test_nothing_outside_the_blob_store_is_served(jf: Jobfleet, dashboard: Dashboard) -> None:
    run = jf.submit("--each", "echo {}", "hello")
    jf("worker", "--idle-exit", "0.3", check=0)
    assert dashboard.request("GET", f"/api/jobs/{run}-1/log") == (200, b"hello\n")
    sources = Path(__file__).resolve().parents[1] / "src" / "jobfleet" / "dashboard" / "app.py"
    never = [Path("/etc/passwd").read_bytes()[:40], b"SQLite format 3", sources.read_bytes()[:60]]
    for path in TRAVERSALS:
        status, body = dashboard.request("GET", path.format(run=run))
        assert status in (400, 404, 405, 422) or (status == 200 and body == b""), (path, status)
        for secret in never:
            assert secret not in body, path


# --- secrets ---------------------------------------------------------------------------------


def test_secrets_stay_out_of_logs_events_ps_and_the_dashboard(jf: Jobfleet, tmp_path: Path) -> None:
    server = require_server()
    with fresh_database(server) as url:
        _secrets(jf, tmp_path, url)


def _secrets(jf: Jobfleet, tmp_path: Path, url: str) -> None:
    from fastapi.testclient import TestClient

    from jobfleet.dashboard import create_app

    key = "k3y-" + secrets.token_hex(8)
    password = "pw-" + secrets.token_hex(8)
    # trust auth: the password is not checked, only carried, as a real one would be
    store = url.replace("postgres@", f"postgres:{password}@", 1)
    jf.env.update(JOBFLEET_STORE=store, MY_API_KEY=key)
    release = tmp_path / "release"
    write_csv(tmp_path / "jobs.csv", ["command", "env.API_KEY", "max_attempts"], [
        # the value whole, split across two writes, and on stderr before failing
        ['echo "key=$API_KEY"; printf %s "${{API_KEY%????????}}"; sleep 0.2;'
         ' printf "%s\\n" "${{API_KEY#"${{API_KEY%????????}}"}}"; echo started;'
         # (a log holds its last bytes back until more come, in case they start a secret)
         " echo ........................................;"
         f' while [ ! -e {release} ]; do sleep 0.05; done; echo "$API_KEY" >&2; exit 3',
         "secret:MY_API_KEY", 1],
    ])
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--slots", "1", "--idle-exit", "1")
    wait_for(lambda: "started" in jf.log(run, 1), 30, what="the job to start")
    # everything running now, the worker and the job included, shows neither in `ps`
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    assert "API_KEY" in ps or "while [" in ps  # the job's command line is there
    assert key not in ps and password not in ps
    release.touch()
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, (out, err)
    assert key not in out + err and password not in out + err

    log = jf.log(run, 1)
    assert log.count("[redacted]") == 3 and key not in log, log
    assert "key=[redacted]" in log
    for command in (["logs", f"{run}-1"], ["events", run, "--json"], ["explain", f"{run}-1"],
                    ["workers"]):
        p = jf(*command, check=0)
        assert key not in p.stdout + p.stderr and password not in p.stdout + p.stderr, command
    assert jf.json("jobs", run)[0]["state"] == "failed"

    with TestClient(create_app(store, str(jf.blobs), "t0ken-" + secrets.token_hex(8)),
                    base_url="http://127.0.0.1:8765") as client:
        for path in ("/", f"/runs/{run}", f"/jobs/{run}-1", "/workers", "/metrics",
                     "/api/runs", f"/api/runs/{run}/jobs", f"/api/jobs/{run}-1",
                     f"/api/jobs/{run}-1/log", "/api/workers", f"/fragments/jobs/{run}-1",
                     "/openapi.json"):
            answer = client.get(path)
            assert answer.status_code == 200, path
            assert key not in answer.text and password not in answer.text, path
    # the secret is stored for the worker (documented), nowhere else
    import psycopg

    with psycopg.connect(url) as c:
        events = [str(row) for row in c.execute("SELECT * FROM events")]
        attempts = [str(row) for row in c.execute("SELECT * FROM attempts")]
        workers = [str(row) for row in c.execute("SELECT * FROM workers")]
    for rows in (events, attempts, workers):
        assert rows and not [r for r in rows if key in r or password in r]


# --- workspaces ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                    reason="bubblewrap is not installed")
def test_a_job_cannot_read_another_jobs_workspace(jf: Jobfleet, tmp_path: Path) -> None:
    # A leaves a secret in its workspace and says where; B, running at the same time, looks
    write_csv(tmp_path / "jobs.csv", ["command"], [
        ["echo topsecret > $HOME/mine.txt; echo $HOME > a_home;"
         " while [ ! -e b_done ]; do sleep 0.05; done"],
        ["while [ ! -s a_home ]; do sleep 0.05; done; w=$(cat a_home);"
         ' echo "looking in $w"; ls -a "$w" > b_saw 2>&1; cat "$w/mine.txt" >> b_saw 2>&1;'
         " touch b_done"],
    ])
    seen = {}
    for sandbox in ("process", "bwrap"):
        for name in ("a_home", "b_saw", "b_done"):
            (tmp_path / name).unlink(missing_ok=True)
        p = jf("run", "jobs.csv", "--slots", "2", "--sandbox", sandbox, "--keep-workspaces",
               check=0, timeout=60)
        assert "2 succeeded" in p.stdout, p.stdout
        home = (tmp_path / "a_home").read_text().strip()
        # the workspace was real (kept), and B looked in the right place: its log says where
        assert (Path(home) / "mine.txt").read_text() == "topsecret\n"
        assert f"looking in {home}" in jf.log(p.stdout.split()[1].rstrip(":"), 2)
        seen[sandbox] = (tmp_path / "b_saw").read_text()
        shutil.rmtree(Path(home).parent)
    # the same user's processes share the machine: B reads A's file...
    assert "topsecret" in seen["process"], seen
    # ...unless bubblewrap gives each job a /tmp of its own with only its own workspace in it
    assert "topsecret" not in seen["bwrap"], seen
    assert seen["bwrap"].startswith("ls: cannot access") and "No such file" in seen["bwrap"]
