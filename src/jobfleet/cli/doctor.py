"""`jobfleet doctor`: check the live setup, each part PASS, WARN, FAIL or SKIP with a fix.

The checks only look: the store is opened as every command opens it, and the blob store
gets one small probe object (under `doctor/`) that is deleted again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import typer

from jobfleet.cli.app import BlobsOpt, JsonOpt, StoreOpt, app, out
from jobfleet.cli.fleet import FleetFlags, FleetOpt, HostsOpt, ProviderOpt, SshKeyOpt
from jobfleet.cli.fmt import dumps, escape
from jobfleet.config import SettingProblem, Settings, load_settings
from jobfleet.errors import JobfleetError
from jobfleet.store.urls import conninfo, masked

if TYPE_CHECKING:
    from jobfleet.store import Store

STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "red", "SKIP": "dim"}
#: clock differences between this machine and the store worth a warning, and a failure, s
SKEW_WARN, SKEW_FAIL = 1.0, 5.0
_NO_PROVIDER = "no fleet provider chosen (--provider, or [fleet] provider in jobfleet.toml)"


@dataclass(slots=True)
class Check:
    check: str
    status: str  # PASS, WARN, FAIL or SKIP
    detail: str
    fix: str | None = None


@app.command()
def doctor(
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
    json: JsonOpt = False,
) -> None:
    """Check the live setup: store, blob store, sandbox, clocks, workers, fleet provider.

    Exits 1 when any check fails, else 0.
    """
    found: list[SettingProblem] = []
    s = load_settings({"store": store, "blobs": blobs}, problems=found)
    checks = [_settings_check(s, [p for p in found if not p.warning])]
    checks += _store_checks(s)
    checks.append(_guarded("blob store", lambda: _blob_check(s.blobs)))
    checks.append(_guarded("sandbox", _sandbox_check))
    checks += _provider_checks(FleetFlags(provider, fleet, hosts=hosts, ssh_key=ssh_key))
    failed = any(c.status == "FAIL" for c in checks)
    if json:
        out.print(dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}))
    else:
        width = max(len(c.check) for c in checks)
        for c in checks:
            out.print(f"[{STYLE[c.status]}]{c.status}[/]  {c.check:<{width}}  {escape(c.detail)}")
            if c.fix and c.status != "PASS":
                out.print(f"      {'':<{width}}  fix: {escape(c.fix)}")
    if failed:
        raise typer.Exit(1)


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """`check()`, an unexpected error in it being its failure rather than the command's."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - a doctor reports, whatever broke
        hint = e.hint if isinstance(e, JobfleetError) else None
        message = e.message if isinstance(e, JobfleetError) else f"{type(e).__name__}: {e}"
        return Check(name, "FAIL", message, hint)


# --- fleet provider ------------------------------------------------------------------------


def _provider_checks(flags: FleetFlags) -> list[Check]:
    """The provider's settings, then whether what it starts workers on answers (hosts over
    SSH, Slurm's controller, AWS), then its quotas where it can read them (aws)."""
    from jobfleet.cli.fleet import fleet_chosen, fleet_settings, open_provider
    from jobfleet.fleet import FAILED

    names = ("provider credentials", "reachable hosts", "quotas")
    if not fleet_chosen(flags):
        return [Check(name, "SKIP", _NO_PROVIDER) for name in names]
    try:
        fs = fleet_settings(flags)
        provider = open_provider(fs)
    except JobfleetError as e:
        return [Check(names[0], "FAIL", e.message, e.hint)] + [
            Check(name, "SKIP", "the provider's settings are not valid") for name in names[1:]]
    described = ", ".join(f"{k} {v}" for k, v in provider.describe().items()
                          if k != "provider" and v not in (None, "", [], ()))
    checks = [Check(names[0], "PASS", f"{fs.provider}: {described}")]
    try:
        machines = provider.list()
    except Exception as e:  # noqa: BLE001 - a doctor reports, whatever broke
        checks.append(Check(names[1], "FAIL", f"{type(e).__name__}: {e}",
                            f"docs/providers/{fs.provider}.md says how to set it up"))
    else:
        down = [m for m in machines if m.phase == FAILED and m.reason
                and "unreachable" in m.reason]
        if down:
            checks.append(Check(names[1], "FAIL", "; ".join(f"{m.host or m.id}: {m.reason}"
                                                            for m in down),
                                f"docs/providers/{fs.provider}.md: what to do when a host will"
                                " not answer"))
        else:
            checks.append(Check(names[1], "PASS", f"{fs.provider} answers; fleet {fs.name} has"
                                f" {len(machines)} worker(s)"))
    quotas = getattr(provider, "quota_report", None)  # providers that can read quotas
    if quotas is None:
        checks.append(Check(names[2], "SKIP", f"{fs.provider} has no quotas jobfleet can read"))
    else:
        status, detail, fix = quotas()
        checks.append(Check(names[2], status, detail, fix))
    provider.close()
    return checks


# --- settings ------------------------------------------------------------------------------


def _settings_check(s: Settings, problems: list[SettingProblem]) -> Check:
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check("settings", "FAIL", f"{first.where}: {first.message}{more}",
                     "`jobfleet validate` lists every problem with its fix")
    given = sorted({source for source in s.sources.values() if source != "default"})
    return Check("settings", "PASS", "from " + (", ".join(given) or "the defaults"))


# --- store ---------------------------------------------------------------------------------


def _store_checks(s: Settings) -> list[Check]:
    """Reachable, schema current, clock skew and workers. The store is read, never changed:
    one that is behind is not migrated here (any other command does that)."""
    from jobfleet.store import sqlfiles

    url = s.store
    postgres = url.startswith(("postgresql://", "postgres://"))
    if postgres:
        reached, version, skew = _reach_postgres(url)
    else:
        reached, version = _reach_sqlite(url)
        skew = Check("clock skew", "PASS", "none: the store is on this machine")
    if reached.status == "FAIL":
        return [reached] + [Check(name, "SKIP", "the store cannot be reached")
                            for name in ("schema", "clock skew", "workers")]
    if version is None:
        return [reached, Check("schema", "SKIP", "no store yet"), skew,
                Check("workers", "SKIP", "no store yet")]
    latest = max(v for v, _ in sqlfiles.migrations("postgres" if postgres else "sqlite"))
    checks = [reached, _schema_check(version, latest), skew]
    if version != latest:
        checks.append(Check("workers", "SKIP", "the schema is not current"))
    else:
        checks.append(_guarded("workers", lambda: _workers_check(url)))
    return checks


def _reach_sqlite(url: str) -> tuple[Check, int | None]:
    """(the reachability check, the schema version, or None when there is no store yet)."""
    import sqlite3
    from urllib.parse import quote

    path = url
    for prefix in ("sqlite://", "file://", "sqlite:"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    path = os.path.abspath(path)
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            return Check("store reachable", "FAIL", f"no store at {path}, and {folder} is not"
                         " writable, so none can be made there",
                         "pass --store with a path in a writable folder (or a PostgreSQL URL)"
                         ), None
        return Check("store reachable", "PASS", f"no store yet at {path}; the first"
                     " `jobfleet run` or `submit` makes it"), None
    try:
        db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=10)
        try:
            row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            row = (0,)
        finally:
            db.close()
    except sqlite3.Error as e:
        return Check("store reachable", "FAIL", f"cannot read the SQLite store {path}: {e}",
                     "check that the file is a jobfleet store readable by this user, or pass"
                     " --store with another path"), None
    return Check("store reachable", "PASS", f"SQLite file {path}"), int(row[0] or 0)


def _schema_check(version: int, latest: int) -> Check:
    if version > latest:
        return Check("schema", "FAIL", f"version {version}, newer than this jobfleet knows"
                     f" ({latest})", "upgrade jobfleet here to the version the fleet runs")
    if version < latest:
        have = f"version {version}" if version else "no jobfleet tables yet"
        return Check("schema", "WARN", f"{have} (the latest is {latest})",
                     "the next jobfleet command that opens the store (e.g. `jobfleet runs`)"
                     " applies the missing migrations")
    return Check("schema", "PASS", f"version {version} (the latest)")


def _reach_postgres(url: str) -> tuple[Check, int | None, Check]:
    """(the reachability check, the schema version, the clock skew check)."""
    import psycopg

    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    address = f"{host}:{parts.port or 5432}"
    try:
        conn = psycopg.connect(conninfo(url), connect_timeout=5, autocommit=True,
                               application_name="jobfleet-doctor")
    except psycopg.Error as e:
        reason = "; ".join(" ".join(line.split()) for line in str(e).splitlines() if line.strip())
        if parts.password:
            reason = reason.replace(parts.password, "***")
        failed = Check("store reachable", "FAIL", f"cannot connect to {address}"
                       f" ({masked(url)}): {reason}", _postgres_fix(reason, parts, address))
        return failed, None, Check("clock skew", "SKIP", "the store cannot be reached")
    with conn:
        before = time.time()
        now_row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        after = time.time()
        exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
        version = 0
        if exists and exists[0]:
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            version = int(row[0] or 0) if row else 0
    skew = float(now_row[0] if now_row else after) - (before + after) / 2
    return (Check("store reachable", "PASS", f"PostgreSQL at {address} ({masked(url)})"),
            version, _skew_check(skew, after - before))


def _postgres_fix(reason: str, parts: Any, address: str) -> str:
    user = parts.username or "postgres"
    database = parts.path.lstrip("/") or user
    if "does not exist" in reason and "database" in reason:
        return (f"create the database: createdb -h {parts.hostname or 'localhost'}"
                f" -p {parts.port or 5432} -U {user} {database}")
    if "password" in reason or "authentication" in reason:
        return (f"check the user {user!r} and its password (in the URL, PGPASSWORD or"
                " ~/.pgpass), and the server's pg_hba.conf")
    local = (parts.hostname or "localhost") in ("localhost", "127.0.0.1", "::1")
    if not local:
        return (f"check that the server on {address} is running and accepts connections from"
                " this machine (listen_addresses, pg_hba.conf, firewall), or fix the host and"
                " port in --store / JOBFLEET_STORE")
    return (f"start the PostgreSQL server on {address}: {_start_command(parts.port or 5432)};"
            " or fix the host and port in --store / JOBFLEET_STORE")


def _start_command(port: int) -> str:
    """How to start the local server for `port`: the Debian cluster that has it, if any."""
    clusters = []
    for conf in sorted(glob.glob("/etc/postgresql/*/*/postgresql.conf")):
        version, name = conf.split("/")[3:5]
        try:
            with open(conf) as f:
                m = re.search(r"^\s*port\s*=\s*(\d+)", f.read(), re.MULTILINE)
        except OSError:
            continue
        clusters.append((version, name, int(m.group(1)) if m else 5432))
    for version, name, cluster_port in clusters:
        if cluster_port == port:
            return (f"`sudo pg_ctlcluster {version} {name} start` (or `sudo systemctl start"
                    f" postgresql@{version}-{name}`)")
    version, name = (clusters[0][0], clusters[0][1]) if clusters else ("15", "main")
    return (f"`sudo systemctl start postgresql` or `sudo pg_ctlcluster {version} {name} start`"
            " (`pg_lsclusters` lists the clusters and their ports; a cluster of your own:"
            " `pg_ctl -D DATADIR start`)")


def _skew_check(skew: float, round_trip: float) -> Check:
    detail = (f"the store's clock is {abs(skew):.3f} s {'ahead of' if skew > 0 else 'behind'}"
              f" this machine's (query round trip {round_trip * 1000:.0f} ms)")
    fix = ("keep the clocks in sync with NTP on every machine (`timedatectl set-ntp true`, or"
           " chrony): leases and heartbeats are compared across machines")
    if abs(skew) >= SKEW_FAIL:
        return Check("clock skew", "FAIL", detail, fix)
    if abs(skew) >= SKEW_WARN:
        return Check("clock skew", "WARN", detail, fix)
    return Check("clock skew", "PASS", detail)


def _workers_check(url: str) -> Check:
    from jobfleet.store import open_store

    with open_store(url) as store:
        return _workers_of(store)


def _workers_of(store: Store) -> Check:
    now = time.time()
    workers = store.workers()
    alive = [w for w in workers
             if w.state in ("running", "draining") and now - w.heartbeat_at < w.lease_seconds]
    silent = sum(1 for w in workers
                 if w.state in ("running", "draining") and w not in alive)
    if alive:
        hosts = sorted({w.host for w in alive})
        detail = f"{len(alive)} alive on {', '.join(hosts)}"
        if silent:
            return Check("workers", "WARN", f"{detail}; {silent} silent (no recent heartbeat)",
                         "`jobfleet workers` shows which; their jobs run again elsewhere once"
                         " their leases expire")
        return Check("workers", "PASS", detail)
    queued = sum(store.counts(r.id)["queued"] for r in store.runs(20))
    if queued:
        return Check("workers", "WARN", f"no worker alive, and {queued} jobs are queued",
                     "start workers: `jobfleet worker` on each machine (or `jobfleet run FILE`)")
    return Check("workers", "PASS", "no worker alive, and no job is waiting for one")


# --- blob store and sandbox ----------------------------------------------------------------


def _blob_check(url: str) -> Check:
    from jobfleet.blobs import LocalBlobs, mask_url, open_blobs

    shown = mask_url(url)
    try:
        blobs = open_blobs(url)
    except JobfleetError as e:
        return Check("blob store", "FAIL", e.message, e.hint or _blob_fix(url))
    prefix = f"doctor/{secrets.token_hex(6)}"
    key, probe = f"{prefix}/probe", b"jobfleet doctor " + secrets.token_bytes(8).hex().encode()
    try:
        blobs.put(key, probe)
        back = blobs.read(key)
        blobs.delete_prefix(prefix)
        left = blobs.exists(key)
        if isinstance(blobs, LocalBlobs):  # no empty doctor/ folder left behind
            with contextlib.suppress(OSError):
                blobs.local_path("doctor").rmdir()
    except (OSError, JobfleetError) as e:
        message = e.message if isinstance(e, JobfleetError) else str(e)
        return Check("blob store", "FAIL", f"{shown}: {message}", _blob_fix(url))
    if back != probe:
        return Check("blob store", "FAIL", f"{shown}: the probe read back differs from what was"
                     " written", "check that nothing else rewrites objects under this prefix")
    if left:
        return Check("blob store", "FAIL", f"{shown}: the probe could not be deleted",
                     "allow deleting objects (cleanup needs it too)")
    return Check("blob store", "PASS", f"wrote, read back and deleted a probe in {blobs.url}")


def _blob_fix(url: str) -> str:
    if "://" in url and not url.lower().startswith("file://"):
        return ("check that the bucket exists and that the credentials here (AWS_PROFILE,"
                " AWS_ACCESS_KEY_ID...) may list, read, write and delete in it")
    return "check that the folder is writable by this user, or pass --blobs with another one"


def _sandbox_check() -> Check:
    """Start `true` as a worker starts a job: the shell, a new session, a clean environment,
    in a fresh working folder."""
    with tempfile.TemporaryDirectory(prefix="jobfleet-doctor-") as folder:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder}
        try:
            done = subprocess.run(["/bin/sh", "-c", "true"], cwd=folder, env=env,
                                  start_new_session=True, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return Check("sandbox", "FAIL", f"cannot start a job process: {e}",
                         "check that /bin/sh exists and that this user may start processes"
                         " (ulimit -u) in the temporary folder")
    if done.returncode != 0:
        return Check("sandbox", "FAIL", f"`true` exited {done.returncode}:"
                     f" {done.stderr.decode(errors='replace').strip()[:200]}",
                     "check /bin/sh and the temporary folder (TMPDIR)")
    return Check("sandbox", "PASS", "process: started `true` in its own session")
