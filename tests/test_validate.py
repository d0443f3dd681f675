"""`jobfleet validate`: every setting with its source, every problem of the settings and of a
job file with its place and fix, nothing submitted; run through the real command line."""

from __future__ import annotations

import json
from typing import Any

from conftest import Jobfleet

BAD_CSV = """command,cpus,timeout
echo 1,1,5s
echo 2,-1,5s

echo 3,2,abc
"echo
4",1,5s
,1,1
echo 6,1,1,extra
echo 7,1,1
"""


def test_a_job_file_with_several_bad_rows_reports_each_with_its_line(jf: Jobfleet) -> None:
    (jf.cwd / "jobs.csv").write_text(BAD_CSV)
    p = jf("validate", "jobs.csv", check=2)
    lines = p.stdout.splitlines()
    for expected in ("jobs.csv:3: column 'cpus': '-1' must be at least 0; fix:",
                     "jobs.csv:5: column 'timeout': 'abc' is not a duration",
                     "jobs.csv:8: column 'command': the job has no command; fix: fill the cell",
                     "jobs.csv:9: this row has 4 cells but the header has 3; fix: quote"):
        assert any(line.strip().startswith(expected) for line in lines), (expected, p.stdout)
    assert "jobs.csv: 3 valid jobs, 4 problems" in p.stdout
    assert not jf.store_path.exists()  # nothing submitted, no store made

    data = _json(jf, "validate", "jobs.csv")
    assert data["ok"] is False and data["file"] == {"path": "jobs.csv", "jobs": 3, "problems": 4}
    assert [(p["line"], p["column"]) for p in data["problems"]] == [
        (3, "cpus"), (5, "timeout"), (8, "command"), (9, None)]


def test_every_bad_row_of_yaml_and_json_lines_files(jf: Jobfleet) -> None:
    (jf.cwd / "jobs.yaml").write_text(
        "timeout: 5s\njobs:\n  - command: echo 1\n  - command: echo 2\n    cpus: -3\n"
        "  - command: echo 3\n  - cpus: 2\n  - command: echo {x}\n")
    data = _json(jf, "validate", "jobs.yaml")
    assert [(p["line"], p["column"]) for p in data["problems"]] == [
        (5, "cpus"), (7, "command"), (8, "command")]
    assert data["file"]["jobs"] == 2
    (jf.cwd / "jobs.jsonl").write_text('{"command": "a"}\n{"command": "b", "cpus": "x"}\n'
                                       '[1]\n\n{bad\n{"command": "c"}\n')
    data = _json(jf, "validate", "jobs.jsonl")
    assert [p["line"] for p in data["problems"]] == [2, 3, 5]
    assert data["file"]["jobs"] == 2


def test_bad_settings_in_env_and_in_the_toml_file_are_both_reported(jf: Jobfleet) -> None:
    (jf.cwd / "jobfleet.toml").write_text(
        '[jobfleet]\nslots = 0\nstore = "db.example.com:5432/jobs"\n')
    p = jf("validate", env={"JOBFLEET_LEASE_SECONDS": "abc", "JOBFLEET_KILL_GRAC": "3"},
           check=2)
    toml = jf.cwd / "jobfleet.toml"
    assert f"{toml}:2: slots = 0: 0 must be at least 1; fix: set slots there" in p.stdout
    assert (f"{toml}:3: store = 'db.example.com:5432/jobs' looks like a URL without its scheme;"
            " fix: write the whole URL, e.g. postgresql://") in p.stdout
    assert ("env JOBFLEET_LEASE_SECONDS: lease_seconds = 'abc': 'abc' is not a duration"
            in p.stdout)
    # a misspelt variable is a warning, with the name it probably meant
    assert "env JOBFLEET_KILL_GRAC: not a setting, so it is ignored; fix: did you mean " \
           "JOBFLEET_KILL_GRACE?" in p.stdout
    data = _json(jf, "validate", env={"JOBFLEET_LEASE_SECONDS": "abc"})
    assert {(p["source"], p["setting"]) for p in data["problems"]} == {
        (str(toml), "slots"), (str(toml), "store"), ("env JOBFLEET_LEASE_SECONDS", "lease_seconds")}


def test_clean_input_exits_0_and_lists_every_setting_with_its_source(jf: Jobfleet) -> None:
    (jf.cwd / "jobfleet.toml").write_text("[jobfleet]\nlease_seconds = '2m'\n")
    (jf.cwd / "jobs.csv").write_text("command,n\necho {n},1\necho {n},2\n")
    p = jf("validate", "jobs.csv", "--blobs", "s3://bucket/prefix",
           "--store", "postgresql://me:secret@db.example.com/jobs", check=0)
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ")}
    assert rows["store"].split()[1:] == ["postgresql://me:***@db.example.com/jobs",
                                         "flag", "--store"]
    assert rows["blobs"].split()[1:] == ["s3://bucket/prefix", "flag", "--blobs"]
    assert rows["lease_seconds"].split()[1:] == ["120s", f"{jf.cwd / 'jobfleet.toml'}:2"]
    assert rows["slots"].split()[2] == "default"
    assert "secret" not in p.stdout
    assert "jobs.csv: 2 valid jobs, ok" in p.stdout and "no problems" in p.stdout
    data = _json(jf, "validate")
    assert data["ok"] is True and data["problems"] == [] and data["file"] is None
    sources = {s["name"]: s["source"] for s in data["settings"]}
    assert sources["store"] == "env JOBFLEET_STORE" and sources["drain_seconds"] == "default"


def test_a_file_that_cannot_be_read_is_one_problem(jf: Jobfleet) -> None:
    p = jf("validate", "missing.csv", check=2)
    assert "missing.csv: cannot read the job file" in p.stdout


def _json(jf: Jobfleet, *args: str, env: dict[str, str] | None = None) -> Any:
    """`validate ... --json`, whatever its exit status."""
    return json.loads(jf(*args, "--json", env=env).stdout)
