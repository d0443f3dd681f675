"""The dashboard: its JSON API, /metrics and token rules (FastAPI's TestClient over a store that
real `jobfleet` commands filled), and an end-to-end test in headless Chromium (Playwright)
against a real `jobfleet dashboard` process and a real worker.

The browser test saves screenshots to $JOBFLEET_TEST_ARTIFACTS, or tests/artifacts/ (ignored
by git). It needs Debian's chromium at /usr/bin/chromium: without it the test is skipped,
except under CI, where it fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Jobfleet, wait_for, write_csv

fastapi = pytest.importorskip("fastapi", reason="the dashboard extra is not installed")
with warnings.catch_warnings():  # newer Starlette would rather have httpx2 behind TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from jobfleet.dashboard import create_app  # noqa: E402

TOKEN = "test-token-0123456789"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("JOBFLEET_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
FAILING = ("echo starting row {n}; sleep {pause};"
           " if [ {n} = 4 ] && [ ! -e fixed.flag ]; then echo BOOM row {n} >&2; exit 3; fi;"
           " echo ok row {n}")


def jobs_file(tmp_path: Path, n: int, pause: float) -> Path:
    """`n` jobs that print and pause (job 4 twice as long); job 4 fails (once: no automatic
    retry) until fixed.flag exists."""
    return write_csv(tmp_path / "jobs.csv", ["command", "n", "pause", "max_attempts"],
                     [[FAILING, i, 2 * pause if i == 4 else pause, 1] for i in range(1, n + 1)])


@pytest.fixture
def finished_run(jf: Jobfleet, tmp_path: Path) -> str:
    """A run of 5 jobs that ended with job 4 failed."""
    jobs_file(tmp_path, 5, 0)
    p = jf("run", "jobs.csv", "--slots", "2", check=1)
    run = re.search(r"^run ([0-9a-f]{8})", p.stdout, re.M)
    assert run, p.stdout
    return run.group(1)


@pytest.fixture
def client(jf: Jobfleet) -> Iterator[TestClient]:
    app = create_app(str(jf.store_path), str(jf.blobs), TOKEN)
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c


# --- the JSON API ----------------------------------------------------------------------------


def test_api_lists_runs_jobs_logs_and_workers(jf: Jobfleet, finished_run: str,
                                              client: TestClient) -> None:
    run = finished_run
    runs = client.get("/api/runs").json()
    assert [r["run"] for r in runs] == [run]
    assert runs[0]["counts"] == {"queued": 0, "running": 0, "succeeded": 4, "failed": 1,
                                 "cancelled": 0, "skipped": 0}
    assert runs[0]["state"] == "finished" and runs[0]["done"] == 5 and runs[0]["rate"] > 0
    assert client.get(f"/api/runs/{run[:4]}").json()["run"] == run  # a unique prefix will do

    failed = client.get(f"/api/runs/{run}/jobs", params={"state": "failed"}).json()
    assert [(j["job"], j["exit_code"], j["reason"]) for j in failed] == [
        (f"{run}-4", 3, "exit code 3")]
    assert len(client.get(f"/api/runs/{run}/jobs").json()) == 5
    assert client.get(f"/api/runs/{run}/jobs", params={"limit": 2}).json()[1]["seq"] == 2

    job = client.get(f"/api/jobs/{run}-4").json()
    assert job["state"] == "failed" and job["command"].startswith("echo starting row 4")
    assert [(a["number"], a["state"], a["exit_code"]) for a in job["attempt_list"]] == [
        (1, "failed", 3)]
    assert [e["kind"] for e in job["events"]] == ["leased", "failed"]

    log = client.get(f"/api/jobs/{run}-4/log")
    assert log.text == "starting row 4\nBOOM row 4\n"
    assert log.headers["content-type"].startswith("text/plain")
    assert (log.headers["x-attempt"], log.headers["x-log-complete"]) == ("1", "1")
    assert log.headers["x-next-offset"] == str(len(log.content))
    rest = client.get(f"/api/jobs/{run}-4/log", params={"offset": 15})
    assert rest.text == "BOOM row 4\n"

    workers = client.get("/api/workers").json()
    assert workers and {w["state"] for w in workers} == {"stopped"}
    assert sum(w["jobs_done"] for w in workers) == 5 and workers[0]["jobs"] == []


def test_api_errors_say_what_and_what_to_do(jf: Jobfleet, finished_run: str,
                                            client: TestClient) -> None:
    missing = client.get("/api/runs/nosuchrun")
    assert missing.status_code == 404
    assert "nosuchrun" in missing.json()["detail"] and missing.json()["hint"]
    assert client.get(f"/api/jobs/{finished_run}-99").status_code == 404
    bad = client.get(f"/api/runs/{finished_run}/jobs", params={"state": "done"})
    assert bad.status_code == 400 and "queued" in bad.json()["hint"]
    assert client.get(f"/api/jobs/{finished_run}-4/log", params={"attempt": 2}).status_code == 404
    page = client.get("/runs/nosuchrun")  # a page's error is a page
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "nosuchrun" in page.text


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/api/runs", "/api/runs/{run}", "/api/runs/{run}/jobs", "/api/jobs/{job}",
            "/api/jobs/{job}/log", "/api/workers", "/api/jobs/{job}/retry",
            "/api/runs/{run}/retry", "/api/runs/{run}/cancel", "/metrics"} <= paths
    assert not any(p.startswith("/fragments") for p in paths)
    assert client.get("/docs").status_code == 200


def test_pages_show_runs_jobs_a_job_and_workers(jf: Jobfleet, finished_run: str,
                                                client: TestClient) -> None:
    run = finished_run
    assert f'href="/runs/{run}"' in client.get("/").text
    page = client.get(f"/runs/{run}").text
    assert all(f'data-job="{run}-{n}"' in page for n in range(1, 6))
    only_failed = client.get(f"/runs/{run}", params={"state": "failed"}).text
    assert f'data-job="{run}-4"' in only_failed and f'data-job="{run}-1"' not in only_failed
    job = client.get(f"/jobs/{run}-4").text
    assert "BOOM row 4" in job and "exit code 3" in job
    workers = client.get("/workers").text
    assert all(f'data-worker="{w["worker"]}"' in workers for w in jf.json("workers"))
    for fragment in ("/fragments/runs", f"/fragments/runs/{run}", f"/fragments/jobs/{run}-4",
                     "/fragments/workers"):
        r = client.get(fragment)
        assert r.status_code == 200 and "<html" not in r.text, fragment
    assert client.get("/static/dashboard.js").status_code == 200


# --- the token -------------------------------------------------------------------------------


def test_actions_always_need_the_token(jf: Jobfleet, finished_run: str, tmp_path: Path,
                                       client: TestClient) -> None:
    run = finished_run
    retry = f"/api/jobs/{run}-4/retry"
    assert client.post(retry).status_code == 401
    assert client.post(retry, headers={"X-Jobfleet-Token": "wrong"}).status_code == 401
    # neither a token in the URL nor the browser's cookie authorizes a change
    assert client.post(retry, params={"token": TOKEN}).status_code == 401
    client.cookies.set("jobfleet_token_8765", TOKEN)
    assert client.post(retry).status_code == 401
    assert jf.json("status", run)["counts"]["failed"] == 1

    done = client.post(retry, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert done["queued"] == 1 and "queued again" in done["message"]
    assert jf.json("status", run)["counts"]["queued"] == 1
    (tmp_path / "fixed.flag").touch()
    jf("worker", "--idle-exit", "1", check=0)
    assert jf.jobs(run)[f"{run}-4"]["state"] == "succeeded"

    again = client.post(f"/api/runs/{run}/retry", headers={"X-Jobfleet-Token": TOKEN}).json()
    assert again["queued"] == 0
    cancel = client.post(f"/api/runs/{run}/cancel", headers={"X-Jobfleet-Token": TOKEN})
    assert cancel.status_code == 200 and cancel.json()["cancelled"] == 0


def test_a_browser_is_given_the_token_once(jf: Jobfleet, finished_run: str,
                                           client: TestClient) -> None:
    plain = client.get(f"/runs/{finished_run}")
    assert 'name="jobfleet-token"' not in plain.text and "disabled" in plain.text

    wrong = client.get("/", params={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401
    first = client.get(f"/runs/{finished_run}", params={"token": TOKEN}, follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"].endswith(f"/runs/{finished_run}")  # out of the address bar
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    page = client.get(f"/runs/{finished_run}").text  # the client kept the cookie
    assert f'<meta name="jobfleet-token" content="{TOKEN}">' in page
    assert f'data-post="/api/runs/{finished_run}/retry"' in page


def test_reads_need_the_token_beyond_loopback(jf: Jobfleet, finished_run: str) -> None:
    app = create_app(str(jf.store_path), str(jf.blobs), TOKEN, protect_reads=True)
    with TestClient(app, base_url="http://192.0.2.1:8765") as c:
        for path in ("/", f"/runs/{finished_run}", "/api/runs", "/metrics", "/openapi.json"):
            assert c.get(path).status_code == 401, path
        assert "?token=" in c.get("/").text  # and the page says how to get in
        assert c.get("/static/dashboard.css").status_code == 200
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/api/runs", headers=bearer).status_code == 200
        assert c.get("/metrics", headers=bearer).status_code == 200
        c.get("/", params={"token": TOKEN})
        assert c.get("/api/runs").status_code == 200  # the browser's cookie


def test_open_reading_is_for_this_machine_only(jf: Jobfleet, finished_run: str) -> None:
    """A page of another site whose name was made to point here (DNS rebinding) reads nothing."""
    app = create_app(str(jf.store_path), str(jf.blobs), TOKEN)
    with TestClient(app, base_url="http://rebound.example:8765") as c:
        refused = c.get("/api/runs")
        assert refused.status_code == 401 and "rebound.example" in refused.json()["detail"]
        assert c.get("/api/runs", headers={"X-Jobfleet-Token": TOKEN}).status_code == 200
    with TestClient(app, base_url="http://localhost:8765") as c:
        assert c.get("/api/runs").status_code == 200


def test_a_long_log_is_read_in_pages_and_shown_by_its_end(jf: Jobfleet,
                                                          client: TestClient) -> None:
    run = jf.submit("--each", "seq 1 {}", "100000")
    jf("worker", "--idle-exit", "1", check=0)
    whole = jf.log(run, 1)
    assert len(whole) > 2 * 256 * 1024
    pages, offset = [], 0
    while True:
        r = client.get(f"/api/jobs/{run}-1/log", params={"offset": offset})
        pages.append(r.text)
        offset = int(r.headers["x-next-offset"])
        if r.headers["x-log-complete"] == "1":
            break
        assert r.headers["x-log-more"] == "1" and len(pages) < 10
    assert "".join(pages) == whole and len(pages) == 3
    page = client.get(f"/jobs/{run}-1").text
    assert "\n100000\n</pre>" in page and "are left out" in page and "\n1\n2\n" not in page


def test_the_command_refuses_to_listen_beyond_loopback_without_a_token(jf: Jobfleet) -> None:
    p = jf("dashboard", "--host", "0.0.0.0", "--port", "1", check=2)
    assert "JOBFLEET_DASHBOARD_TOKEN" in p.stderr and "0.0.0.0" in p.stderr
    assert "dashboard" in jf("--help", check=0).stdout
    # the other commands do not load the web stack
    code = "import sys, jobfleet.cli; print(sorted({'fastapi', 'uvicorn'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# --- /metrics --------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, checking the text format's shape as it goes."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\S+)', line)
        assert m, f"not a Prometheus sample: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in typed or family in typed, f"{line!r} has no TYPE"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_queue_wait_leaves_out_backoff_and_counts_from_a_retry() -> None:
    from jobfleet.dashboard.metrics import tally
    from jobfleet.store import Event, Run

    run = Run("r", None, None, None, created_at=100.0, total=1, cancelled=False)
    t = tally(run, [
        Event(100.0, "submitted", "r", None, None, {"jobs": 1}),
        Event(102.0, "leased", "r", 1, "w", {"attempt": 1}),  # waited 2
        Event(105.0, "failed", "r", 1, "w", {"attempt": 1, "then": "queued", "retry_at": 110.0}),
        Event(111.0, "leased", "r", 1, "w", {"attempt": 2}),  # waited 1: the backoff left out
        Event(112.0, "failed", "r", 1, "w", {"attempt": 2, "then": "failed"}),
        Event(200.0, "retried", "r", None, None, {"jobs": 1}),  # `jobfleet retry RUN`
        Event(204.0, "leased", "r", 1, "w", {"attempt": 3}),  # waited 4
        Event(205.0, "succeeded", "r", 1, "w", {"attempt": 3}),
    ])
    assert (t.waits.total, sum(t.waits.counts)) == (7.0, 3)
    assert (t.durations["failed"].total, t.durations["succeeded"].total) == (4.0, 1.0)
    assert t.retries == {"automatic": 1, "manual": 1} and t.attempts["failed"] == 2


def test_metrics_count_jobs_attempts_durations_waits_and_retries(
        jf: Jobfleet, finished_run: str, client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(r.text)
    assert m['jobfleet_jobs{state="succeeded"}'] == 4 and m['jobfleet_jobs{state="failed"}'] == 1
    assert m['jobfleet_runs{state="finished"}'] == 1
    assert m['jobfleet_attempts_total{outcome="succeeded"}'] == 4
    assert m['jobfleet_attempts_total{outcome="failed"}'] == 1
    assert m['jobfleet_job_duration_seconds_count{outcome="succeeded"}'] == 4
    assert m['jobfleet_job_duration_seconds_bucket{outcome="failed",le="+Inf"}'] == 1
    buckets = [v for k, v in m.items() if k.startswith("jobfleet_queue_wait_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 5  # cumulative, one wait per attempt
    assert m["jobfleet_queue_wait_seconds_sum"] >= 0
    assert m['jobfleet_retries_total{kind="manual"}'] == 0
    assert m["jobfleet_workers_alive"] == 0 and m['jobfleet_workers{state="stopped"}'] >= 1
    assert m["jobfleet_throughput_jobs_per_second"] > 0  # they ended within the last minute

    client.post(f"/api/runs/{finished_run}/retry", headers={"X-Jobfleet-Token": TOKEN})
    m = parse_metrics(client.get("/metrics").text)
    assert m['jobfleet_retries_total{kind="manual"}'] == 1
    assert m['jobfleet_jobs{state="queued"}'] == 1 and m['jobfleet_runs{state="active"}'] == 1
    jf("worker", "--idle-exit", "1", check=0)  # fails again: the flag is still missing
    m = parse_metrics(client.get("/metrics").text)
    assert m['jobfleet_attempts_total{outcome="failed"}'] == 2  # a settled run, read again
    assert m["jobfleet_queue_wait_seconds_count"] == 6


def test_metrics_count_lease_expiries_and_workers_alive(jf: Jobfleet, marker: str,
                                                        client: TestClient) -> None:
    run = jf.submit("--each", "sleep {}", marker)
    worker = jf.popen("worker", "--slots", "1", "--lease-seconds", "1")
    wait_for(lambda: jf.json("status", run)["counts"]["running"] == 1, 20, what="job running")
    m = parse_metrics(client.get("/metrics").text)
    assert m["jobfleet_workers_alive"] == 1 and m['jobfleet_jobs{state="running"}'] == 1
    assert client.get("/api/workers").json()[0]["jobs"] == [f"{run}-1"]

    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    with jf.open_store() as db:
        wait_for(db.reap, 10, what="the lease to expire")
    m = parse_metrics(client.get("/metrics").text)
    assert m["jobfleet_lease_expiries_total"] == 1
    assert m['jobfleet_attempts_total{outcome="lease_expired"}'] == 1
    assert m['jobfleet_retries_total{kind="automatic"}'] == 1
    assert m["jobfleet_workers_alive"] == 0 and m['jobfleet_workers{state="silent"}'] == 1
    jf("cancel", run, check=0)


# --- end to end, in a browser ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's headless Chromium under Playwright; skipped without it (failed under CI)."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[dev]')"
    if why is None and not CHROMIUM.exists():
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the browser test: {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def test_browser_follows_a_live_run_and_retries_a_failed_job(
        jf: Jobfleet, tmp_path: Path, browser: Any) -> None:
    from playwright.sync_api import expect

    shots = ARTIFACTS / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    jobs_file(tmp_path, 6, 1.5)
    run = jf.submit("jobs.csv")

    port = free_port()
    server = jf.popen("dashboard", "--port", str(port))
    address = ""
    while "token=" not in address:
        line = server.stdout.readline() if server.stdout else ""
        assert line, f"the dashboard printed no address: {server.communicate()}"
        address = line if "token=" in line else ""
    url = re.search(r"http://\S+\?token=\S+", address)
    assert url and url.group().startswith(f"http://127.0.0.1:{port}/"), address

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url.group())  # keeps the token, and drops it from the address
    assert page.url == f"http://127.0.0.1:{port}/"
    page.click(f"a[href='/runs/{run}']")
    done = page.locator("[data-testid=done]")
    expect(done).to_have_text("0")
    page.screenshot(path=shots / "1-run-queued.png", full_page=True)

    # a worker starts: the counts advance on the open page, without a reload
    jf.popen("worker", "--run", run, "--slots", "2", "--lease-seconds", "10")
    seen = {int(done.inner_text())}
    while 6 not in seen:
        page.wait_for_timeout(200)
        seen.add(int(done.inner_text()))
        if 0 < max(seen) < 6 and not (shots / "2-run-progress.png").exists():
            page.screenshot(path=shots / "2-run-progress.png", full_page=True)
    assert any(0 < n < 6 for n in seen), f"the page never showed the run under way: {seen}"
    expect(page.locator("[data-testid=count-failed]")).to_have_text("1")
    expect(page.locator("[data-testid=count-succeeded]")).to_have_text("5")

    # the failed job, with its log
    page.click("nav.filter a[data-state=failed]")
    expect(page.locator("table.jobs tr[data-job]")).to_have_count(1)
    page.click(f"a[href='/jobs/{run}-4']")
    expect(page.locator("h1 .badge")).to_have_text("failed")
    expect(page.locator("pre#log")).to_contain_text("BOOM row 4")
    page.screenshot(path=shots / "3-failed-job.png", full_page=True)

    # fix the cause, press retry: it runs again, its new log followed live, and succeeds
    (tmp_path / "fixed.flag").touch()
    page.click("button[data-post$='/retry']")
    expect(page.locator("#flash")).to_contain_text(f"job {run}-4 queued again")
    expect(page.locator("h1 .badge")).to_have_text("running")
    expect(page.locator(".log-attempt")).to_have_text("2")  # the log follows the new attempt
    expect(page.locator("pre#log")).to_contain_text("starting row 4")
    expect(page.locator("pre#log")).not_to_contain_text("BOOM")
    page.screenshot(path=shots / "4-retried-running.png", full_page=True)
    expect(page.locator("h1 .badge")).to_have_text("succeeded")
    expect(page.locator("pre#log")).to_have_text("starting row 4\nok row 4\n")
    expect(page.locator("tr[data-attempt]")).to_have_count(2)
    page.screenshot(path=shots / "5-retried-succeeded.png", full_page=True)

    page.click(f"a[href='/runs/{run}']")
    expect(page.locator("[data-testid=count-succeeded]")).to_have_text("6")
    page.goto(f"http://127.0.0.1:{port}/workers")
    expect(page.locator("table.workers tr[data-worker]")).to_have_count(1)
    page.screenshot(path=shots / "6-workers.png", full_page=True)
    assert jf.json("status", run)["counts"]["succeeded"] == 6
