"""`jobfleet doctor`: each part of the live setup PASS, WARN, FAIL or SKIP with a fix; run
through the real command line against SQLite, a stopped and a running PostgreSQL, a folder
and S3 (moto's emulator)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pg
from conftest import Jobfleet
from s3 import S3


def doctor(jf: Jobfleet, *args: str, check: int = 0, env: dict[str, str] | None = None
           ) -> dict[str, dict[str, Any]]:
    """`doctor --json`, each check by name, after asserting the exit status."""
    p = jf("doctor", *args, "--json", check=check, env=env)
    return {c["check"]: c for c in json.loads(p.stdout)["checks"]}


def statuses(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items()}


def test_the_default_sqlite_and_folder_setup_passes(jf: Jobfleet) -> None:
    checks = doctor(jf)
    assert "FAIL" not in statuses(checks).values()
    assert checks["store reachable"]["detail"].startswith("no store yet at ")
    assert checks["blob store"]["status"] == "PASS" and checks["sandbox"]["status"] == "PASS"
    for name in ("provider credentials", "reachable hosts", "quotas"):
        assert checks[name]["status"] == "SKIP"
        assert "no fleet provider chosen" in checks[name]["detail"]
    assert not (jf.blobs / "doctor").exists()  # the probe is gone, its folder too

    (jf.cwd / "jobs.csv").write_text("command\ntrue\n")
    jf("submit", "jobs.csv", check=0)
    checks = doctor(jf)
    assert statuses(checks) == {
        "settings": "PASS", "store reachable": "PASS", "schema": "PASS", "clock skew": "PASS",
        "workers": "WARN", "blob store": "PASS", "sandbox": "PASS",
        "provider credentials": "SKIP", "reachable hosts": "SKIP", "quotas": "SKIP"}
    assert checks["workers"]["detail"] == "no worker alive, and 1 jobs are queued"
    assert "jobfleet worker" in checks["workers"]["fix"]

    text = jf("doctor", check=0).stdout
    assert re.search(rf"^PASS +store reachable +SQLite file {re.escape(str(jf.store_path))}$",
                     text, re.MULTILINE), text


def test_a_stopped_postgresql_fails_the_store_check_with_its_address_and_how_to_start_it(
        jf: Jobfleet, tmp_path: Path) -> None:
    cluster = pg.Cluster(tmp_path)
    try:
        cluster.start()
        cluster.stop()
        checks = doctor(jf, "--store", cluster.url, check=1)
    finally:
        cluster.destroy()
    store = checks["store reachable"]
    assert store["status"] == "FAIL"
    assert f"cannot connect to 127.0.0.1:{cluster.port}" in store["detail"]
    assert "Connection refused" in store["detail"]
    assert f"start the PostgreSQL server on 127.0.0.1:{cluster.port}" in store["fix"]
    assert "systemctl start postgresql" in store["fix"] and "pg_ctl" in store["fix"]
    assert [name for name, status in statuses(checks).items() if status == "FAIL"] == [
        "store reachable"]
    assert checks["blob store"]["status"] == "PASS" and checks["sandbox"]["status"] == "PASS"
    assert checks["schema"]["status"] == checks["workers"]["status"] == "SKIP"

    text = jf("doctor", "--store", cluster.url, check=1).stdout
    assert re.search(rf"^FAIL +store reachable +cannot connect to 127\.0\.0\.1:{cluster.port} ",
                     text, re.MULTILINE), text
    assert "fix: start the PostgreSQL server" in text


def test_a_running_postgresql_passes_and_is_not_changed(jf: Jobfleet) -> None:
    from jobfleet.store import sqlfiles

    server = pg.require_server()
    latest = sqlfiles.migrations("postgres")[-1][0]
    with pg.fresh_database(server) as url:
        checks = doctor(jf, "--store", url)
        assert checks["store reachable"]["status"] == "PASS"
        assert checks["schema"] == {"check": "schema", "status": "WARN",
                                    "detail": f"no jobfleet tables yet (the latest is {latest})",
                                    "fix": checks["schema"]["fix"]}
        assert checks["clock skew"]["status"] == "PASS"
        assert "the store's clock is" in checks["clock skew"]["detail"]
        jf("runs", "--store", url, check=0)  # opens the store: migrates it
        checks = doctor(jf, "--store", url)
        assert "FAIL" not in statuses(checks).values() and "WARN" not in statuses(checks).values()
        assert checks["schema"]["detail"] == f"version {latest} (the latest)"


def test_s3_blobs_pass_and_a_missing_bucket_fails_with_a_fix(jf: Jobfleet, s3: S3) -> None:
    checks = doctor(jf, "--blobs", s3.url)
    assert checks["blob store"]["status"] == "PASS"
    assert checks["blob store"]["detail"] == (
        f"wrote, read back and deleted a probe in s3://{s3.bucket}/prefix")
    assert s3.objects() == []

    checks = doctor(jf, "--blobs", f"s3://{s3.bucket}-missing/prefix", check=1)
    blob = checks["blob store"]
    assert blob["status"] == "FAIL" and f"{s3.bucket}-missing" in blob["detail"]
    assert blob["fix"]
    assert checks["store reachable"]["status"] == "PASS"


def test_bad_settings_fail_and_point_at_validate(jf: Jobfleet) -> None:
    checks = doctor(jf, env={"JOBFLEET_LEASE_SECONDS": "soon"}, check=1)
    assert checks["settings"]["status"] == "FAIL"
    assert checks["settings"]["detail"].startswith("env JOBFLEET_LEASE_SECONDS: lease_seconds")
    assert "jobfleet validate" in checks["settings"]["fix"]


def test_a_chosen_provider_is_checked(jf: Jobfleet, tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    checks = doctor(jf, "--provider", "local", "--fleet", "doc", env=env)
    assert checks["provider credentials"]["status"] == "PASS"
    assert "this machine" in checks["provider credentials"]["detail"]
    assert checks["reachable hosts"]["status"] == "PASS"
    assert "fleet doc has 0 worker(s)" in checks["reachable hosts"]["detail"]
    (tmp_path / "jobfleet.toml").write_text('[fleet]\nprovider = "ssh"\n'
                                            '[providers.ssh]\nhosts = "alice@:x"\n')
    p = jf("doctor", "--json", env=env, check=1)
    found = {c["check"]: c for c in json.loads(p.stdout)["checks"]}
    assert found["provider credentials"]["status"] == "FAIL"
    assert "hosts" in found["provider credentials"]["detail"]
    assert found["reachable hosts"]["status"] == "SKIP"
