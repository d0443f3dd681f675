"""Spot interruptions: a real `jobfleet worker --spot-watch` against a SQLite store, and a
local HTTP stand-in for EC2's instance metadata service (IMDSv2: a session token first) on
127.0.0.1 that starts announcing a reclaim in the middle of long jobs. No EC2 instance can
run here; the stand-in answers the same paths with the same headers and bodies.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for, write_csv
from jobfleet.worker.spot import SpotWatcher, notice_reason

TOKEN = "imds-session-token-1"
NOTICE = {"action": "terminate", "time": "2026-11-22T10:02:00Z"}


class Imds(ThreadingHTTPServer):
    """The metadata paths a spot watcher reads; `notice` set: a reclaim is announced."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.notice: dict[str, str] | None = None
        self.token = TOKEN
        self.tokens_issued = 0
        self.refused: list[str] = []  # paths asked for without a valid token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Imds

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token" or not self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"):
            return self._answer(400)
        self.server.tokens_issued += 1
        self._answer(200, self.server.token.encode())

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self.server.refused.append(self.path)
            return self._answer(401)
        if self.path == "/latest/meta-data/spot/instance-action" and self.server.notice:
            return self._answer(200, json.dumps(self.server.notice).encode())
        self._answer(404)


@pytest.fixture
def imds() -> Iterator[Imds]:
    server = Imds()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_watcher_uses_a_session_token_and_renews_it(imds: Imds) -> None:
    seen: list[str] = []
    watcher = SpotWatcher(seen.append, env={"JOBFLEET_IMDS_URL": imds.url})
    assert watcher.check() is None and imds.tokens_issued == 1
    imds.token = "a-new-token"  # the old one expired: refused once, then renewed
    imds.notice = NOTICE
    assert watcher.check() == ("interrupted: spot instance reclaimed (terminate at"
                               " 2026-11-22T10:02:00Z)")
    assert imds.tokens_issued == 2 and imds.refused == ["/latest/meta-data/spot/instance-action"]
    assert notice_reason(b"not json") == "interrupted: spot instance reclaimed (terminate)"
    nowhere = SpotWatcher(seen.append, env={"JOBFLEET_IMDS_URL": "http://127.0.0.1:9"})
    assert nowhere.check() is None  # no metadata service: said once in the log, no notice
    assert seen == []


def test_spot_notice_hands_running_jobs_back_at_once(jf: Jobfleet, imds: Imds, marker: str,
                                                     tmp_path: Path) -> None:
    """Two long jobs run on a worker watching the stand-in; when it announces a reclaim the
    jobs are queued again within seconds (not after their lease's 60 s), their attempts say
    why and used none of their budget, the worker exits, and a second worker finishes them."""
    command = f'if [ "$JOBFLEET_ATTEMPT" = 1 ]; then sleep {marker}; fi; echo finished'
    run = jf.submit(str(write_csv(tmp_path / "jobs.csv", ["command", "max_attempts"],
                                  [[command, 1], [command, 1]])))
    worker = jf.popen("worker", "--run", run, "--slots", "2", "--spot-watch", "--idle-exit",
                      "60", env={"JOBFLEET_IMDS_URL": imds.url, "JOBFLEET_SPOT_POLL": "0.2"})
    with jf.open_store() as db:
        wait_for(lambda: [j.state for j in db.jobs(run)] == ["running"] * 2, 30,
                 what="both jobs running")
        assert imds.tokens_issued >= 1 and imds.refused == []
        imds.notice = NOTICE
        noticed = time.monotonic()
        wait_for(lambda: [j.state for j in db.jobs(run)] == ["queued"] * 2, 10,
                 what="both jobs queued again")
        took = time.monotonic() - noticed
        out, err = worker.communicate(timeout=15)
        assert worker.returncode == 0, err
        assert "interrupted: spot instance reclaimed (terminate at 2026-11-22T10:02:00Z)" in out
        for job in db.jobs(run):
            [attempt] = db.attempts(job.key)
            assert attempt.state == "released"
            assert attempt.reason == ("interrupted: spot instance reclaimed (terminate at"
                                      " 2026-11-22T10:02:00Z)")
    assert took < 5, f"jobs went back to the queue {took:.1f}s after the notice"

    jf("worker", "--run", run, "--idle-exit", "0.5", check=0)  # a second worker: no watch
    jobs = jf.jobs(run)
    assert [j["state"] for j in jobs.values()] == ["succeeded"] * 2  # max_attempts 1 was enough
    assert jf.log(run, 1, attempt=2).strip() == "finished"
    events = jf("events", run, check=0).stdout
    assert events.count("interrupted: spot instance reclaimed") == 2
    explained = jf("explain", f"{run}-1", check=0).stdout
    assert "attempt 1 was handed back: interrupted: spot instance reclaimed" in explained
