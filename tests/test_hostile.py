"""Hostile input, fuzzed with hypothesis (fixed budgets, derandomized): job files, template
values, output globs, run and job references, dashboard parameters.

Each input gets a clean error (exit status 2 and a message, never a traceback; a 4xx answer,
never a 500) or is handled safely, and nothing already stored changes. The job files are fed to
the real `jobfleet` CLI's entry point in this process (the same code as the command, without an
interpreter start per example); a few are also given to the command itself, and the values
that must stay literal are run by a real worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import string
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Jobfleet, write_csv
from jobfleet.blobs import LocalBlobs
from jobfleet.worker.outputs import missing_outputs, upload_outputs


def fuzz(n: int) -> Any:
    """A fixed example budget, the same examples on every run."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def snapshot(db: Path) -> tuple[list[Any], list[Any]]:
    """The store's runs and jobs, row by row."""
    if not db.exists():
        return [], []
    with contextlib.closing(sqlite3.connect(db)) as c:
        return (c.execute("SELECT * FROM runs ORDER BY id").fetchall(),
                c.execute("SELECT * FROM jobs ORDER BY id").fetchall())


def cli(*args: str) -> tuple[int, str, str]:
    """`jobfleet ARGS` through the command's entry point, in this process."""
    from jobfleet.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["jobfleet", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def store(jf: Jobfleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A store with one run in it already (what must not change), for in-process commands."""
    for k, v in jf.env.items():
        if k.startswith("JOBFLEET_"):
            monkeypatch.setenv(k, v)
    monkeypatch.chdir(jf.cwd)
    jf.submit("--each", "echo {}", "first", "second")
    yield jf.store_path


def submit_is_clean(path: Path, db: Path) -> None:
    """Submitting `path` stores one whole run, or says why not (status 2) and stores nothing."""
    before = snapshot(db)
    code, out, err = cli("submit", str(path), "--json")
    after = snapshot(db)
    assert "Traceback" not in err + out
    if code == 0:
        run = json.loads(out)
        assert set(before[0]) <= set(after[0]) and len(after[0]) == len(before[0]) + 1
        assert set(before[1]) <= set(after[1]), "a stored job changed"
        new_jobs = [j for j in after[1] if j not in before[1]]
        assert len(new_jobs) == run["jobs"] and {j[1] for j in new_jobs} == {run["run"]}
    else:
        assert code == 2, (code, out, err)
        assert err.startswith("error: ") and path.name in err, err
        assert after == before, "a refused file changed the store"


# --- job files ---------------------------------------------------------------------------------

NASTY = ['"', '""', '","', "\n", "\r\n", "\x00", "{x}", "{", "}", "{{", "'", ";", "a,b", "\t",
         "\ufeff", "$(id)", "\u2028", "\\", "secret:NOPE", "1e999", "-1", "99999999999999999999",
         "\ud800"]
cell = st.one_of(st.text(max_size=12), st.sampled_from(NASTY))
header_name = st.one_of(st.sampled_from(["command", "name", "x", "memory", "cpus", "outputs",
                                         "env.A", "env.1", "", "command ", "max_attempts",
                                         "timeout", "retry_on", "workdir"]), st.text(max_size=6))
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"]


@st.composite
def table_files(draw: st.DrawFn) -> bytes:
    header = draw(st.lists(header_name, min_size=1, max_size=4))
    rows = draw(st.lists(st.lists(cell, min_size=1, max_size=5), max_size=4))
    sep = draw(st.sampled_from([",", "\t", ";"]))
    if draw(st.booleans()):  # properly quoted, as a spreadsheet writes it
        import csv

        buffer = io.StringIO()
        csv.writer(buffer, delimiter=sep).writerows([header, *rows])
        text = buffer.getvalue()
    else:  # joined as is: quotes and separators fall where they may
        text = "\n".join(sep.join(r) for r in [header, *rows]) + draw(st.sampled_from(["", "\n"]))
    if draw(st.integers(0, 9)) == 0:
        text += "\necho {x}," + "x" * draw(st.sampled_from([70_000, 140_000]))
    encoding = draw(st.sampled_from(ENCODINGS))
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf-8") else "replace")


@fuzz(80)
@given(data=table_files(), suffix=st.sampled_from([".csv", ".tsv"]))
def test_fuzzed_tables_are_stored_whole_or_refused_cleanly(store: Path, data: bytes,
                                                           suffix: str) -> None:
    path = store.parent.parent / f"fuzz{suffix}"
    path.write_bytes(data)
    submit_is_clean(path, store)


scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                   st.sampled_from(NASTY))
tree = st.recursive(scalar, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.sampled_from(["command", "jobs", "groups", "env", "x",
                                                       "cpus", "outputs", "name", "memory"])
                                      | st.text(max_size=5), kids, max_size=3), max_leaves=12)


@st.composite
def documents(draw: st.DrawFn, kind: str) -> str:
    """JSON, JSON Lines or YAML text: a random tree, a job file with random values, deep
    nesting, repeated keys, or YAML anchors and aliases."""
    shape = draw(st.sampled_from(["tree", "jobs", "deep", "repeated", "aliases"]))
    if shape == "deep":
        depth = draw(st.sampled_from([50, 5000, 50_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
        inner = opener * depth + "1" + closer * depth
        job = '{"command": "echo {x}", "x": ' + inner + "}"
        return job + "\n" if kind == "jsonl" else '{"jobs": [' + job + "]}\n"
    if shape == "repeated":
        key = draw(st.sampled_from(["command", "x", "env", "jobs"]))
        job = f'{{"command": "echo", "{key}": "1", "{key}": "2"}}'
        return job + "\n" if kind == "jsonl" else '{"jobs": [' + job + "]}"
    if shape == "aliases" and kind == "yaml":
        width = draw(st.integers(1, 9))
        lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]"
                                   for i in range(1, 10)]
        return "\n".join([*lines, "command: echo {x}", "jobs:", "  - {x: *a9}", ""])
    if shape == "jobs":
        value = {"command": draw(st.sampled_from(["echo {x}", "echo", "", "{x}", "{"])),
                 "jobs": draw(st.lists(st.dictionaries(
                     st.sampled_from(["x", "cpus", "memory", "outputs", "env", "name", "timeout",
                                      "max_attempts", "secret_env", "command"]), tree,
                     max_size=4), max_size=3))}
    else:
        value = draw(tree)
    if kind == "jsonl":
        items = value.get("jobs", [value]) if isinstance(value, dict) else [value]
        return "".join(json.dumps(item, allow_nan=True) + "\n" for item in items)
    if kind == "json":
        return json.dumps(value, allow_nan=True)
    import yaml

    return str(yaml.safe_dump(value, allow_unicode=True))


@fuzz(60)
@given(data=st.data(), kind=st.sampled_from(["json", "jsonl", "yaml"]))
def test_fuzzed_documents_are_stored_whole_or_refused_cleanly(store: Path, data: st.DataObject,
                                                              kind: str) -> None:
    text = data.draw(documents(kind))
    path = store.parent.parent / f"fuzz.{kind}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    submit_is_clean(path, store)


HOSTILE_FILES = {  # what used to end in a traceback or run altered (the fuzz does the rest)
    "nul.csv": b"command\necho a\x00b\n",
    "deep.yaml": b"jobs:\n  - command: echo {x}\n    x: " + b"[" * 20000 + b"]" * 20000 + b"\n",
    "deep.jsonl": b'{"command": "echo", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}\n",
    "surrogate.json": b'{"jobs": [{"command": "echo \\ud800"}]}',
    "utf16.csv": "command\necho hi\n".encode("utf-16"),
    "overflow.yaml": b"jobs:\n - command: echo\n   memory: 99999999999999999999999GiB\n",
}


def test_hostile_files_get_a_clean_error_from_the_command(jf: Jobfleet) -> None:
    jf.submit("--each", "echo {}", "kept")
    before = snapshot(jf.store_path)
    for name, content in HOSTILE_FILES.items():
        (jf.cwd / name).write_bytes(content)
        p = jf("submit", name)
        assert p.returncode == 2, (name, p.stdout, p.stderr)
        assert p.stderr.startswith(f"error: {name}") and "Traceback" not in p.stderr, p.stderr
    assert snapshot(jf.store_path) == before
    assert [r["total"] for r in jf.json("runs")] == [1]


# --- values that must stay literal, and names, run by a real worker ---------------------------

LITERALS = ["a b", "it's", 'say "hi"', "x; touch PWNED", "$(touch PWNED)", "`touch PWNED`",
            "a\nb", "*", "~", "-n", "$HOME", "a\\b", "| touch PWNED", "&& touch PWNED",
            "> PWNED", "{x}", "{{", "%s%n", "\t", "#", "!", "$((1+1))", "${IFS}", "'\"'\"'",
            "ünï©ødé", "--", "a\rb"]


def test_template_values_reach_a_real_job_as_literal_values(jf: Jobfleet) -> None:
    # the name column too: names and values like these never become paths
    rows = [["printf '%s' {x}", f"../../{v}", v] for v in LITERALS]
    write_csv(jf.cwd / "jobs.csv", ["command", "name", "x"], rows)
    (jf.cwd / "doc.yaml").write_text(
        "command: printf '%s' {x}\njobs:\n" + "".join(
            f"  - x: {json.dumps(v)}\n" for v in LITERALS))
    for source in ("jobs.csv", "doc.yaml"):
        p = jf("run", source, "--slots", "2", check=0, timeout=120)
        run = p.stdout.split()[1].rstrip(":")
        for seq, value in enumerate(LITERALS, 1):
            assert jf.log_path(run, seq, 1).read_bytes().decode() == value, (source, value)
    assert not list(jf.cwd.rglob("PWNED")) and not (jf.cwd.parent / "PWNED").exists()
    logs = sorted(p.name for p in (jf.blobs / "logs").rglob("*") if p.is_file())
    assert len(logs) == 2 * len(LITERALS)


# --- output globs that climb out of the job's folder -----------------------------------------


def test_outputs_outside_the_jobs_folder_are_never_stored(jf: Jobfleet, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"outside-{tmp_path.name}.txt"
    outside.write_text("not yours\n")
    try:
        write_csv(jf.cwd / "jobs.csv", ["command", "outputs", "max_attempts"], [
            ["true", f"../{outside.name}", 1],
            ["true", "/etc/passwd", 1],
            ["ln -sf /etc/passwd link1.txt", "link1.txt", 1],
            ["ln -sfn /etc dirlink", "dirlink", 1],
            ["mkdir -p o && echo mine > o/ok.txt && ln -sf /etc/hostname o/evil.txt", "o/*.txt", 1],
            ["true", "/etc/host*", 1],
        ])
        jf("run", "jobs.csv", "--slots", "1", check=1)
    finally:
        outside.unlink()
    jobs = {j["seq"]: j for j in jf.json("jobs", "latest")}
    assert [jobs[n]["state"] for n in range(1, 7)] == ["failed"] * 4 + ["succeeded", "failed"]
    for n in (1, 2, 3, 4, 6):
        assert "outside the job's folder" in jobs[n]["reason"], jobs[n]
    stored = sorted(str(p.relative_to(jf.blobs)) for p in (jf.blobs / "outputs").rglob("*")
                    if p.is_file())
    assert stored == [f"outputs/{jobs[5]['run']}/5/o/ok.txt"]
    assert (jf.blobs / stored[0]).read_text() == "mine\n"


PARTS = ["..", ".", "*", "**", "etc", "", "/", "passwd", "in", "link", "dlink", "ok.txt", "x*"]


@fuzz(150)
@given(st.lists(st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map("/".join),
                min_size=1, max_size=3))
def test_fuzzed_output_globs_store_only_files_of_the_jobs_folder(
        tmp_path_factory: pytest.TempPathFactory, patterns: list[str]) -> None:
    root = tmp_path_factory.mktemp("globs")
    work, outside = root / "work", root / "outside"
    (work / "in").mkdir(parents=True)
    outside.mkdir()
    (work / "in" / "ok.txt").write_text("inside\n")
    (work / "ok.txt").write_text("inside\n")
    (root / "ok.txt").write_text("OUTSIDE\n")
    (outside / "ok.txt").write_text("OUTSIDE\n")
    (work / "link").symlink_to("/etc/passwd")
    (work / "in" / "link").symlink_to(outside / "ok.txt")
    (work / "dlink").symlink_to(outside)
    store = tmp_path_factory.mktemp("blobs")
    keys = upload_outputs(LocalBlobs(store), "r1", 1, patterns, str(work))
    stored = [p for p in store.rglob("*") if not p.is_dir()]
    assert len(stored) == len(keys)
    for path in stored:
        assert path.read_bytes() == b"inside\n", (patterns, path)
    # what is not stored is said to be missing, never silently dropped
    missing = missing_outputs(patterns, str(work))
    for pattern in patterns:
        said = [m for m in missing if m == pattern or m.startswith(f"{pattern} (")]
        if not keys:
            assert said, (pattern, missing)


# --- run and job references --------------------------------------------------------------------

REFS = ["../../etc/passwd", "..", "%2e%2e", "abc-1/../../x", "-1", "a" * 5000, "latest-0",
        "ffffffff-99999999999999999999", "\x00", "$(id)", "RUN-1", " ", "0x1f", "1-1-1", "-"]
ref = st.one_of(st.sampled_from(REFS), st.text(max_size=20),
                st.text(alphabet=string.hexdigits + "-", max_size=12))


@fuzz(60)
@given(command=st.sampled_from(["status", "jobs", "logs", "events", "explain", "results"]), r=ref)
def test_fuzzed_references_are_refused_cleanly(store: Path, tmp_path: Path, command: str,
                                               r: str) -> None:
    before = snapshot(store)
    args = [command, r] + (["--to", str(tmp_path / "fetched")] if command == "results" else [])
    code, out, err = cli(*args)
    assert "Traceback" not in out + err
    # a reference that names nothing (or is not one) is an error; `latest` and prefixes work
    assert code in (0, 1, 2), (code, err)
    if code:
        assert err.startswith("error: ") or "Usage:" in err, err
    assert snapshot(store) == before
    assert not (tmp_path / "fetched").exists() or all(
        p.resolve().is_relative_to(tmp_path / "fetched") for p in (tmp_path / "fetched").rglob("*"))


@pytest.mark.parametrize("command", ["retry", "cancel"])
def test_actions_on_references_that_climb_out_change_nothing(store: Path, command: str) -> None:
    before = snapshot(store)
    for r in ["../../etc/passwd", "%2e%2e", "abc-1/../../x", "a" * 5000, "\x00", "ffffffff-1"]:
        code, out, err = cli(command, r)
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (r, err)
    assert snapshot(store) == before


# --- the dashboard's parameters ----------------------------------------------------------------

fastapi = pytest.importorskip("fastapi", reason="the dashboard extra is not installed")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "hostile-test-token-0123"


@pytest.fixture
def client(store: Path, jf: Jobfleet) -> Iterator[TestClient]:
    from jobfleet.dashboard import create_app

    with TestClient(create_app(str(store), str(jf.blobs), TOKEN),
                    base_url="http://127.0.0.1:8765") as c:
        yield c


ROUTES = ["/api/runs/{r}", "/api/runs/{r}/jobs?state={q}&limit={n}", "/api/jobs/{r}",
          "/api/jobs/{r}/log?attempt={n}&offset={n}", "/runs/{r}?state={q}", "/jobs/{r}",
          "/fragments/runs/{r}", "/fragments/jobs/{r}", "/api/runs?limit={n}", "/static/{r}"]
number = st.one_of(st.integers().map(str), st.sampled_from(["", "x", "1e9", "-0", "9" * 40]))


@fuzz(150)
@given(route=st.sampled_from(ROUTES), r=ref, q=st.one_of(st.sampled_from(["failed", ""]), ref),
       n=number)
def test_fuzzed_dashboard_parameters_are_refused_cleanly(store: Path, client: TestClient,
                                                         route: str, r: str, q: str,
                                                         n: str) -> None:
    before = snapshot(store)
    url = route.format(r=quote(r, safe=""), q=quote(q, safe=""), n=quote(n, safe=""))
    answer = client.get(url)  # a server error would be raised here, not answered
    assert answer.status_code < 500, (url, answer.status_code, answer.text[:300])
    assert "Traceback" not in answer.text
    assert "root:x:0:0" not in answer.text
    assert snapshot(store) == before
    answer = client.post(url.split("?")[0].replace("/log", "") + "/cancel")
    assert answer.status_code in (401, 404, 405), (url, answer.status_code)
    assert snapshot(store) == before


def test_no_route_reads_the_files_beside_the_blob_store(client: TestClient,
                                                        jf: Jobfleet) -> None:
    """The blobs folder's parent holds the store: no route reads it."""
    for url in ["/static/../state/jobfleet.db", "/static/%2e%2e/%2e%2e/state/jobfleet.db",
                "/static/..%2f..%2f..%2fetc%2fpasswd", "/api/jobs/..%2f..%2fstate-1/log",
                f"/static/{quote(str(jf.store_path), safe='')}"]:
        answer = client.get(url)
        assert answer.status_code in (400, 404), (url, answer.status_code)
        assert b"SQLite format" not in answer.content and b"root:x:0:0" not in answer.content


def test_huge_log_offsets_are_a_clean_answer(client: TestClient, jf: Jobfleet) -> None:
    run = jf.submit("--each", "echo {}", "one")
    jf("worker", "--idle-exit", "0.3", check=0)
    for offset in (10**6, 2**63 - 1, 2**63, 10**30):
        answer = client.get(f"/api/jobs/{run}-1/log", params={"offset": offset})
        assert answer.status_code in (200, 400, 422), (offset, answer.status_code)
        if answer.status_code == 200:
            assert answer.text == ""
    assert os.path.exists(jf.log_path(run, 1, 1))
