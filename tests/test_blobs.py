"""Blob stores: the local folder and `s3://bucket/prefix` through fsspec, behind one interface.

S3 is moto's S3 emulator, run by a fixture as a server process on 127.0.0.1 (a free port),
because no real S3 is reachable here; it speaks the same HTTP API, so s3fs and botocore run
their real code against it. The AWS variables that point at it (dummy credentials,
AWS_ENDPOINT_URL) are set only for these tests and the commands they start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for, write_csv
from jobfleet.blobs import Blobs, LocalBlobs, mask_url, open_blobs
from jobfleet.blobs import remote as remote_blobs
from jobfleet.blobs.remote import ChunkedLogWriter, FsspecBlobs, s3_options
from jobfleet.errors import ConfigError
from jobfleet.worker.outputs import output_files, upload_outputs
from s3 import S3

# --- the S3 emulator (tests/s3.py); nothing else of AWS is reachable -------------------------


@pytest.fixture(autouse=True)
def _nowhere_but_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test here may reach AWS itself, or look for instance metadata: S3 URLs lead to a
    closed loopback port unless the `s3` fixture points them at the emulator."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture(params=["local", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Blobs:
    """A blob store of each kind, empty."""
    if request.param == "local":
        return open_blobs(tmp_path / "blobs")
    return open_blobs(request.getfixturevalue("s3").url)


# --- the interface, on both kinds --------------------------------------------------------------


def test_put_read_exists_and_delete_prefix(blobs: Blobs) -> None:
    assert not blobs.exists("results/r1/1-1.pkl")
    assert blobs.read("results/r1/1-1.pkl") == b""
    assert blobs.size("results/r1/1-1.pkl") is None

    blobs.put("results/r1/1-1.pkl", b"first value")
    blobs.put("results/r1/1-1.pkl", b"second value")  # replaced whole
    blobs.put("results/r1/2-1.pkl", b"x" * 100_000)
    blobs.put("results/r10/1-1.pkl", b"another run")  # shares the prefix `results/r1` as text
    assert blobs.exists("results/r1/1-1.pkl")
    assert blobs.read("results/r1/1-1.pkl") == b"second value"
    assert blobs.read("results/r1/1-1.pkl", 7) == b"value"
    assert blobs.read("results/r1/1-1.pkl", 7, 3) == b"val"
    assert blobs.read("results/r1/1-1.pkl", 100) == b""
    assert blobs.size("results/r1/2-1.pkl") == 100_000
    assert blobs.find("results/r1") == [("results/r1/1-1.pkl", 12), ("results/r1/2-1.pkl", 100_000)]

    assert blobs.delete_prefix("results/r1") == 2
    assert not blobs.exists("results/r1/1-1.pkl")
    assert blobs.find("results/r1") == []
    assert blobs.read("results/r10/1-1.pkl") == b"another run"
    assert blobs.delete_prefix("results/r1") == 0


def test_files_go_in_and_come_out_whole(blobs: Blobs, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    source.write_bytes(data)
    assert blobs.put_file("outputs/r1/1/data/big.bin", source) == len(data)

    dest = tmp_path / "back" / "deep" / "big.bin"
    assert blobs.get_file("outputs/r1/1/data/big.bin", dest) == len(data)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no partial file left
    with pytest.raises(FileNotFoundError):
        blobs.get_file("outputs/r1/1/nothing", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_a_log_is_read_whole_and_its_end_tailed(blobs: Blobs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_blobs, "CHUNK_SIZE", 100)  # many chunks from a small log
    key = "logs/r1/3-1.log"
    lines = [f"line {i}\n".encode() for i in range(200)]
    writer = blobs.log_writer(key)
    assert not writer.written
    for line in lines:
        writer.write(line)
    writer.close()
    assert writer.written

    whole = b"".join(lines)
    assert blobs.read(key) == whole
    assert blobs.read(key, 1000, 250) == whole[1000:1250]  # across chunk boundaries
    assert blobs.read(key, len(whole)) == b""
    assert blobs.size(key) == len(whole)
    assert blobs.exists(key)
    assert blobs.tail(key, 2) == ["line 198", "line 199"]
    assert blobs.find("logs/r1") == [(key, len(whole))]  # a log is one blob, however stored
    assert blobs.delete_prefix("logs") == 1
    assert blobs.read(key) == b""


def test_an_attempt_that_prints_nothing_leaves_no_log(blobs: Blobs) -> None:
    writer = blobs.log_writer("logs/r1/1-1.log")
    writer.tick(float("inf"))
    writer.close()
    assert not writer.written
    assert not blobs.exists("logs/r1/1-1.log")
    assert blobs.find("logs") == []


# --- logs in chunks ----------------------------------------------------------------------------


def test_a_log_is_stored_as_numbered_chunks_under_its_key(s3: S3,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_blobs, "CHUNK_SIZE", 10)
    writer = open_blobs(s3.url).log_writer("logs/r1/7-1.log")
    writer.write(b"0123456789abc")  # passes the size: stored at once
    writer.write(b"def")
    writer.close()
    assert s3.objects() == ["prefix/logs/r1/7-1.log/000001", "prefix/logs/r1/7-1.log/000002"]
    assert open_blobs(s3.url).read("logs/r1/7-1.log") == b"0123456789abcdef"


def test_a_follower_sees_chunks_as_they_are_flushed(s3: S3) -> None:
    key = "logs/r1/1-1.log"
    writer = open_blobs(s3.url).log_writer(key)
    follower = open_blobs(s3.url)  # another process, another machine
    writer.write(b"first line\n")
    assert writer.due_at is not None
    writer.tick(writer.due_at - 0.5)  # not due yet: held back
    assert follower.read(key) == b""

    writer.tick(writer.due_at)
    assert writer.due_at is None
    offset = len(seen := follower.read(key))
    assert seen == b"first line\n"

    writer.write(b"second line\n")
    assert follower.read(key, offset) == b""
    writer.tick(writer.due_at)
    assert follower.read(key, offset) == b"second line\n"
    offset += len(b"second line\n")

    writer.write(b"last words\n")
    writer.close()  # stores the rest
    assert follower.read(key, offset) == b"last words\n"
    assert follower.read(key) == b"first line\nsecond line\nlast words\n"


def test_a_local_log_holds_nothing_back(tmp_path: Path) -> None:
    blobs = open_blobs(tmp_path)
    writer = blobs.log_writer("logs/r1/1-1.log")
    writer.write(b"at once\n")
    assert writer.due_at is None
    assert (tmp_path / "logs/r1/1-1.log").read_bytes() == b"at once\n"
    writer.close()


def test_a_failing_store_costs_the_log_not_the_job(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = open_blobs(s3.url)
    assert isinstance(blobs, FsspecBlobs)
    real_put_chunk = blobs.put_chunk
    down = True

    def flaky(key: str, number: int, data: bytes) -> None:
        if down:
            raise remote_blobs.BlobError("the network is down")
        real_put_chunk(key, number, data)

    monkeypatch.setattr(blobs, "put_chunk", flaky)
    writer = blobs.log_writer("logs/r1/1-1.log")
    assert isinstance(writer, ChunkedLogWriter)
    writer.write(b"kept while the store is down\n")
    assert writer.due_at is not None
    writer.tick(writer.due_at)  # fails quietly, tried again later
    assert writer.due_at is not None
    down = False
    writer.tick(writer.due_at)
    writer.close()
    assert blobs.read("logs/r1/1-1.log") == b"kept while the store is down\n"


# --- opening stores, and what goes wrong -------------------------------------------------------


def test_folders_and_file_urls_are_local(tmp_path: Path) -> None:
    for url in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        blobs = open_blobs(url)
        assert isinstance(blobs, LocalBlobs)
        assert blobs.root == tmp_path / "a"
        assert blobs.location == str(tmp_path / "a")


@pytest.mark.parametrize(("url", "says"), [
    ("s3://", "names no bucket"),
    ("nosuch://bucket/x", "scheme jobfleet does not know"),
    ("s3://AKIAEXAMPLE:sEcReT@bucket/x", "holds credentials"),
])
def test_bad_urls_are_refused_with_what_to_do(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_blobs(url)
    assert says in caught.value.message
    assert caught.value.hint
    assert "sEcReT" not in str(caught.value)


def test_a_missing_bucket_is_refused_on_open(s3: S3) -> None:
    with pytest.raises(ConfigError) as caught:
        open_blobs("s3://no-such-bucket-here/x")
    assert "bucket 'no-such-bucket-here' does not exist" in caught.value.message
    assert s3.env["AWS_ENDPOINT_URL"] in caught.value.message
    assert caught.value.exit_code == 2


def test_a_missing_s3fs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    registry = importlib.import_module("fsspec.registry")  # (fsspec.registry is a mapping)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs raises ImportError
    monkeypatch.delitem(registry._registry, "s3", raising=False)  # as if never imported
    with pytest.raises(ConfigError) as caught:
        open_blobs("s3://bucket/x")
    assert "jobfleet[s3]" in (caught.value.hint or "")


def test_passwords_are_masked_and_endpoints_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert mask_url("ftp://me:pw@host/x") == "ftp://me:***@host/x"
    assert mask_url("s3://bucket/x") == "s3://bucket/x"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert s3_options() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert s3_options() == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3 one wins
    assert s3_options() == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:2"}}


def test_a_bad_blob_store_stops_a_run_before_anything_is_stored(jf: Jobfleet, s3: S3,
                                                                 tmp_path: Path) -> None:
    write_csv(tmp_path / "jobs.csv", ["command"], [["echo hello"]])
    before = jf("run", "jobs.csv", "--blobs", s3.url, env=s3.env, check=0)
    old_keys = s3.objects()
    assert old_keys

    for url, says in [("s3://no-such-bucket-here/x", "does not exist"),
                      ("nosuch://bucket/x", "does not know"),
                      ("s3://AKIAEXAMPLE:sEcReT@bucket/x", "holds credentials")]:
        p = jf("run", "jobs.csv", "--blobs", url, env=s3.env, check=2)
        assert says in p.stderr and "→" in p.stderr, p.stderr
        assert "sEcReT" not in p.stderr + p.stdout
        p = jf("logs", f"{_run_id(before.stdout)}-1", "--blobs", url, env=s3.env, check=2)

    assert [r["run"] for r in jf.json("runs")] == [_run_id(before.stdout)]  # nothing new
    assert s3.objects() == old_keys  # nothing lost
    assert jf("logs", f"{_run_id(before.stdout)}-1", "--blobs", s3.url, env=s3.env,
              check=0).stdout == "hello\n"


# --- the worker and the CLI on S3 --------------------------------------------------------------


def _run_id(stdout: str) -> str:
    first = stdout.splitlines()[0]
    assert first.startswith("run "), stdout
    return first.split()[1].rstrip(":")


def test_jobfleet_run_on_s3_records_logs_that_jobfleet_logs_reads(jf: Jobfleet, s3: S3,
                                                                  tmp_path: Path) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "max_attempts"], [
        ["echo hello from one; echo to stderr >&2", 1],
        ["seq 1 20000", 1],  # 108,894 bytes
        ["true", 1],
        ["echo going down; exit 3", 1],
    ])
    p = jf("run", "jobs.csv", "--blobs", s3.url, env=s3.env, check=1)
    run = _run_id(p.stdout)
    assert "going down" in p.stdout + p.stderr  # the failure's log excerpt, read from S3

    logs = [k for k in s3.objects() if k.startswith(f"prefix/logs/{run}/")]
    assert f"prefix/logs/{run}/1-1.log/000001" in logs
    assert not any(k.startswith(f"prefix/logs/{run}/3-1.log") for k in logs)  # printed nothing
    assert jf("logs", f"{run}-1", "--blobs", s3.url, env=s3.env, check=0).stdout == (
        "hello from one\nto stderr\n")
    numbers = jf("logs", f"{run}-2", "--blobs", s3.url, env=s3.env, check=0).stdout
    assert numbers == "".join(f"{i}\n" for i in range(1, 20001))
    assert "printed nothing" in jf("logs", f"{run}-3", "--blobs", s3.url, env=s3.env,
                                   check=0).stderr
    assert not (tmp_path / "state" / "blobs").exists()  # nothing went to the local folder


def test_logs_follow_on_s3_streams_while_the_job_runs(jf: Jobfleet, s3: S3,
                                                      tmp_path: Path) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "timeout"], [
        ["echo line one; while [ ! -e release ]; do sleep 0.05; done; echo line two", "60s"]])
    run = jf.submit("jobs.csv")
    worker = jf.popen("worker", "--run", run, "--idle-exit", "2", "--slots", "1",
                      "--blobs", s3.url, env=s3.env)
    try:
        wait_for(lambda: jf.jobs(run)[f"{run}-1"]["state"] == "running", 15,
                 what="the job to start")
        follow = jf.popen("logs", f"{run}-1", "--follow", "--blobs", s3.url, env=s3.env)
        seen: list[str] = []
        assert follow.stdout is not None
        reader = threading.Thread(target=lambda: seen.extend(iter(follow.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        wait_for(lambda: "line one\n" in seen, 10, what="`logs --follow` to print the first line")
        assert follow.poll() is None, "logs --follow returned while the job still runs"
    finally:
        (tmp_path / "release").touch()
    assert follow.wait(15) == 0
    reader.join(5)
    assert seen == ["line one\n", "line two\n"]
    assert worker.wait(15) == 0


def test_big_call_values_travel_through_s3(jf: Jobfleet, s3: S3) -> None:
    env = {**jf.env, **s3.env, "JOBFLEET_BLOBS": s3.url}
    body = """
        import json, os, jobfleet

        def double(data):
            return data + data

        if __name__ == "__main__":
            blob = os.urandom(300_000)
            run = jobfleet.submit_map(double, [blob, b"small"], workers=1)
            run.wait(timeout=60)
            ok = run.results() == [blob + blob, b"smallsmall"]
            print(json.dumps({"ok": ok, "removed": run.cleanup(), "run": run.id}))
    """
    path = jf.cwd / "big_values.py"
    path.write_text(textwrap.dedent(body))
    p = subprocess.run([sys.executable, str(path)], cwd=jf.cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    assert out == {"ok": True, "removed": 2, "run": out["run"]}
    assert not [k for k in s3.objects() if "/payloads/" in k or "/results/" in k]
    assert any(k.startswith("prefix/functions/") for k in s3.objects())


# --- declared outputs --------------------------------------------------------------------------


def _make_outputs(cwd: Path) -> None:
    (cwd / "out" / "sub").mkdir(parents=True)
    (cwd / "out" / "a.txt").write_text("alpha\n")
    (cwd / "out" / "sub" / "b.txt").write_text("beta\n")
    (cwd / "summary.csv").write_text("x,y\n1,2\n")
    (cwd / "ignored.log").write_text("not declared\n")


def test_output_files_are_named_by_their_path_in_the_workdir(tmp_path: Path) -> None:
    _make_outputs(tmp_path / "work")
    elsewhere = tmp_path / "elsewhere" / "2024"
    elsewhere.mkdir(parents=True)
    (elsewhere / "far.csv").write_text("far\n")
    found = output_files(["out", "*.csv", "out/**/*.txt", f"{tmp_path}/elsewhere/*/far.csv"],
                         str(tmp_path / "work"))
    # a file outside the job's folder is never an output (see test_hostile.py)
    assert sorted(found) == ["out/a.txt", "out/sub/b.txt", "summary.csv"]


def test_outputs_are_uploaded_and_results_fetches_them(jf: Jobfleet, blobs: Blobs,
                                                       tmp_path: Path) -> None:
    url = blobs.location
    run = jf.submit("--each", "true {}", "one", "two")
    work = tmp_path / "work"
    _make_outputs(work)
    keys = upload_outputs(blobs, run, 2, ["out/**/*.txt", "*.csv"], str(work))
    assert keys == [f"outputs/{run}/2/out/a.txt", f"outputs/{run}/2/out/sub/b.txt",
                    f"outputs/{run}/2/summary.csv"]

    p = jf("results", run, "--to", "fetched", "--blobs", url, check=0)
    assert p.stdout.startswith("3 files, ") and f"from run {run}" in p.stdout, p.stdout
    fetched = tmp_path / "fetched"
    assert sorted(str(f.relative_to(fetched)) for f in fetched.rglob("*") if f.is_file()) == [
        "2/out/a.txt", "2/out/sub/b.txt", "2/summary.csv"]
    assert (fetched / "2" / "out" / "sub" / "b.txt").read_text() == "beta\n"
    summary = jf.json("results", run, "--to", "again", "--blobs", url)
    assert (summary["files"], summary["bytes"]) == (3, 6 + 5 + 8)


def test_results_of_a_run_without_outputs_says_why(jf: Jobfleet, tmp_path: Path) -> None:
    run = jf.submit("--each", "true {}", "one")
    p = jf("results", run, "--to", "fetched", check=1)
    assert f"run {run} has no uploaded outputs" in p.stderr and "→" in p.stderr
    assert not (tmp_path / "fetched").exists()
    assert "no run" in jf("results", "ffffffff", "--to", "fetched", check=2).stderr.lower()


def test_results_refuses_names_that_climb_out(tmp_path: Path) -> None:
    from jobfleet.cli.results import UnsafeKey, relative_name

    blobs = LocalBlobs(tmp_path)
    assert str(relative_name("outputs/r1/1/out/a.txt", "outputs/r1", blobs)) == "1/out/a.txt"
    for key in ("outputs/r1/1/../../../x", "outputs/r1/", "outputs/r1//etc/passwd/.."):
        with pytest.raises(UnsafeKey):
            relative_name(key, "outputs/r1", blobs)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_jobfleet_run_uploads_declared_outputs(jf: Jobfleet, tmp_path: Path, kind: str,
                                               request: pytest.FixtureRequest) -> None:
    blobs_args = ["--blobs", request.getfixturevalue("s3").url] if kind == "s3" else []
    write_csv(tmp_path / "jobs.csv", ["command", "outputs"], [
        ["mkdir -p out/1 && echo one > out/1/result.txt", "out/1/*.txt"],
        ["mkdir -p out/2 && echo two > out/2/result.txt && echo sum > sum2.csv",
         "out/2/*.txt;sum2.csv"],
    ])
    run = _run_id(jf("run", "jobs.csv", *blobs_args, check=0).stdout)
    p = jf("results", run, "--to", "fetched", *blobs_args, check=0)
    assert p.stdout.startswith("3 files, "), p.stdout
    fetched = tmp_path / "fetched"
    assert (fetched / "1" / "out" / "1" / "result.txt").read_text() == "one\n"
    assert (fetched / "2" / "out" / "2" / "result.txt").read_text() == "two\n"
    assert (fetched / "2" / "sum2.csv").read_text() == "sum\n"
