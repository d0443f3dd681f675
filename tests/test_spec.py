"""Job-file readers: CSV/TSV, JSON, JSON Lines, YAML and --each, and their error locations."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from jobfleet.errors import SpecError
from jobfleet.spec import JobSpec, each_jobs, iter_jobs, make_job, read_jobs


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding, newline="")
    return path


def error(path: Path, **kw: object) -> SpecError:
    with pytest.raises(SpecError) as e:
        read_jobs(path, **kw)  # type: ignore[arg-type]
    return e.value


# --- CSV ----------------------------------------------------------------------------------


def test_csv_every_reserved_column(tmp_path: Path) -> None:
    header = ("command,name,cpus,memory,gpus,timeout,max_attempts,workdir,outputs,skip_if_done,"
              "min_size,instance_type,retry_on,retry_delay,sample\n")
    row = ("gzip -k {sample},job-1,2.5,512MiB,1,1h,5,runs/{sample},out/{sample}.gz;log/*.txt,"
           "yes,1KB,c5.large,\"1,137\",30s,a b\n")
    [job] = read_jobs(write(tmp_path, "jobs.csv", header + row))
    assert job == JobSpec(
        command="gzip -k 'a b'", name="job-1", cpus=2.5, memory=512 * 2**20, gpus=1,
        timeout=3600.0, max_attempts=5, workdir="runs/a b", outputs=("out/a b.gz", "log/*.txt"),
        skip_if_done=True, min_size=1000, instance_type="c5.large", retry_on=(1, 137),
        retry_delay=30.0, params={"sample": "a b"},
    )


def test_csv_blank_cells_keep_defaults_and_reserved_values_are_parameters(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "command,cpus,name\necho {name} {cpus},,\necho {cpus},4,x\n")
    first, second = read_jobs(path)
    assert (first.cpus, first.name, first.command) == (1.0, None, "echo '' ''")
    assert (second.cpus, second.command) == (4.0, "echo 4")
    assert first.params == {}


@pytest.mark.parametrize("column, value, words", [
    ("memory", "lots", "not a size"),
    ("memory", "-1GB", "not a size"),
    ("timeout", "5 minutes", "not a duration"),
    ("retry_delay", "x", "not a duration"),
    ("cpus", "two", "not a number"),
    ("gpus", "1.5", "not a whole number"),
    ("max_attempts", "0", "at least 1"),
    ("skip_if_done", "maybe", "not true or false"),
    ("retry_on", "\"1,x\"", "not a whole number"),
])
def test_bad_values_name_file_line_and_column(
    tmp_path: Path, column: str, value: str, words: str
) -> None:
    path = write(tmp_path, "jobs.csv", f"command,{column}\necho ok,\necho bad,{value}\n")
    e = error(path)
    assert (e.source, e.line, e.column) == (str(path), 3, column)
    assert str(e).startswith(f"{path}:3: column '{column}': ")
    assert words in str(e)


@pytest.mark.parametrize("column, value, expected", [
    ("memory", "2GiB", 2 * 2**30), ("memory", "1.5g", 1_500_000_000), ("memory", "100", 100),
    ("timeout", "90", 90.0), ("timeout", "5m", 300.0), ("timeout", "250ms", 0.25),
    ("timeout", "1d", 86400.0),
])
def test_good_sizes_and_durations(tmp_path: Path, column: str, value: str, expected: float) -> None:
    [job] = read_jobs(write(tmp_path, "jobs.csv", f"command,{column}\necho,{value}\n"))
    assert getattr(job, column) == expected


def test_bad_row_seven_reports_line_seven(tmp_path: Path) -> None:
    rows = "".join(f"echo {i},1\n" for i in range(5))
    path = write(tmp_path, "jobs.csv", "command,cpus\n" + rows + "echo bad,many\necho 9,1\n")
    e = error(path)
    assert str(e).startswith(f"{path}:7: column 'cpus'")
    assert "jobs.csv:7" in str(e)


def test_multiline_cells_and_blank_lines_keep_physical_line_numbers(tmp_path: Path) -> None:
    text = ('command,note,cpus\n'          # 1
            'echo {note},"two\n'            # 2
            'lines",1\n'                    # 3
            '\n'                            # 4 blank
            'echo {note},"three\n'          # 5
            '\n'                            # 6 (inside the quoted cell)
            'lines",2\n'                    # 7
            'echo {note},x,nope\n')         # 8
    path = write(tmp_path, "jobs.csv", text)
    e = error(path)
    assert (e.line, e.column) == (8, "cpus")
    good = write(tmp_path, "good.csv", text.replace("nope", "3"))
    assert [j.params["note"] for j in read_jobs(good)] == ["two\nlines", "three\n\nlines", "x"]


def test_error_in_a_row_after_a_multiline_cell_in_a_template(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", 'command,a\necho {a},"x\ny"\necho {b},z\n')
    e = error(path)
    assert (e.line, e.column) == (4, "command")
    assert "unknown field {b}" in str(e)
    assert "{a}" in (e.hint or "")


def test_unknown_template_field_in_default_command(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "sample\ns1\n")
    e = error(path, defaults={"command": "process {smaple}"})
    assert str(e).startswith(f"{path}:2: column 'command': unknown field {{smaple}}")
    assert "did you mean {sample}" in str(e)


def test_missing_command_column(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "sample,cpus\ns1,2\n")
    e = error(path)
    assert (e.source, e.line) == (str(path), 1)
    assert "no 'command' column" in str(e)
    [job] = read_jobs(path, defaults={"command": "gzip {sample}"})
    assert job.command == "gzip s1"


def test_blank_command_cell_without_default(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.csv", "command,x\necho,1\n,2\n"))
    assert (e.line, e.column) == (3, "command")


def test_env_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "command,env.OMP_NUM_THREADS,env.MODE\nrun,4,\nrun,,fast\n")
    first, second = read_jobs(path, defaults={"env": {"MODE": "slow", "HOME2": "/h"}})
    assert first.env == {"MODE": "slow", "HOME2": "/h", "OMP_NUM_THREADS": "4"}
    assert second.env == {"MODE": "fast", "HOME2": "/h"}


@pytest.mark.parametrize("column", ["env.1X", "env.A-B", "env.", "env"])
def test_bad_env_column_names(tmp_path: Path, column: str) -> None:
    e = error(write(tmp_path, "jobs.csv", f"command,{column}\nrun,1\n"))
    assert (e.line, e.column) == (1, column)


def test_header_problems(tmp_path: Path) -> None:
    e = error(write(tmp_path, "dup.csv", "command,a,a\nrun,1,2\n"))
    assert (e.line, e.column) == (1, "a") and "twice" in str(e)
    e = error(write(tmp_path, "noname.csv", "command,,a\nrun,1,2\n"))
    assert "column 2 of the header has no name" in str(e)


def test_row_cell_counts(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "command,a,b\necho {a}{b}\necho {a},1,2,\n")
    short, trailing_blank = read_jobs(path)
    assert short.params == {"a": "", "b": ""}
    assert trailing_blank.params == {"a": "1", "b": "2"}
    e = error(write(tmp_path, "long.csv", "command,a\necho,1\necho,1,oops\n"))
    assert e.line == 3 and "3 cells but the header has 2" in str(e)


def test_bom_crlf_and_spaces_in_header(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "command , sample\r\necho {sample},x y\r\n",
                 encoding="utf-8-sig")
    [job] = read_jobs(path)
    assert job.command == "echo 'x y'"


def test_unclosed_quote_is_reported_where_it_starts(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.csv", 'command,a\necho,1\necho,"open\necho,2\n'))
    assert e.line == 3


def test_tsv_and_tab_keep_quotes_literal(tmp_path: Path) -> None:
    for name in ("jobs.tsv", "jobs.tab"):
        path = write(tmp_path, name, 'command\tfile\necho "hi"\t5" disk.txt\n')
        [job] = read_jobs(path)
        assert job.command == 'echo "hi"'
        assert job.params == {"file": '5" disk.txt'}


def test_relative_workdir_stays_as_written(tmp_path: Path) -> None:
    [job] = read_jobs(write(tmp_path, "jobs.csv", "command,workdir\nls,../data/{command}\n"))
    assert job.workdir == "../data/ls"


def test_min_size_needs_outputs(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.csv", "command,min_size\nls,1KB\n"))
    assert (e.line, e.column) == (2, "min_size")


def test_defaults_apply_to_tables(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "file,cpus,out\na.txt,,\nb.txt,3,o2\n")
    defaults = {"command": "gzip -c {file} > {out}", "cpus": 2, "out": "o1",
                "outputs": ["{out}"], "max_attempts": 1}
    first, second = read_jobs(path, defaults=defaults)
    assert (first.command, first.cpus, first.outputs, first.max_attempts) == (
        "gzip -c a.txt > o1", 2.0, ("o1",), 1)
    assert (second.command, second.cpus, second.outputs) == ("gzip -c b.txt > o2", 3.0, ("o2",))


def test_bad_defaults_are_reported_as_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "command\nls\n")
    e = error(path, defaults={"cpus": "many"})
    assert (e.source, e.column) == ("defaults", "cpus")


# --- files with no jobs, unknown formats --------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("jobs.csv", ""), ("jobs.csv", "\n\n"), ("jobs.csv", "command,a\n"), ("jobs.json", "[]"),
    ("jobs.json", '{"command": "x"}'), ("jobs.yaml", ""), ("jobs.yaml", "jobs: []\n"),
    ("jobs.jsonl", "\n"),
])
def test_no_jobs(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, name, text)
    assert f"no jobs in {path}" in str(error(path))


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.txt", "x"))
    assert ".csv" in (e.hint or "") and ".yaml" in (e.hint or "")
    assert "cannot read" in str(error(tmp_path / "missing.csv"))


# --- JSON / YAML --------------------------------------------------------------------------


def test_json_defaults_jobs_override_and_env_merge(tmp_path: Path) -> None:
    doc = {"command": "run {plate} {n} {flag}", "cpus": 2, "env": {"A": "1", "B": 2},
           "flag": False, "n": 3,
           "jobs": [{"plate": "P1"},
                    {"plate": "P2", "cpus": 4, "n": 1.5, "env": {"B": "x", "C": True, "A": None},
                     "outputs": ["out/{plate}.csv", "log/{plate}"]},
                    {"plate": "P3", "command": "other {plate}", "cpus": None}]}
    first, second, third = read_jobs(write(tmp_path, "jobs.json", json.dumps(doc, indent=1)))
    assert (first.command, first.cpus, first.env) == ("run P1 3 false", 2.0, {"A": "1", "B": "2"})
    assert first.params == {"flag": "false", "n": "3", "plate": "P1"}
    assert (second.command, second.cpus) == ("run P2 1.5 false", 4.0)
    assert second.env == {"B": "x", "C": "true"}
    assert second.outputs == ("out/P2.csv", "log/P2")
    assert (third.command, third.cpus) == ("other P3", 2.0)


def test_groups_alias_and_both_is_an_error(tmp_path: Path) -> None:
    text = '{"command": "cp {Metadata}", "groups": [{"Metadata": "a"}]}'
    path = write(tmp_path, "jobs.json", text)
    assert read_jobs(path)[0].command == "cp a"
    e = error(write(tmp_path, "both.yaml", "command: x\njobs: []\ngroups: []\n"))
    assert (e.line, e.column) == (3, "groups")


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.json", '[{"command": "a"}, {"command": "b {x}", "x": 1}]')
    assert [j.command for j in read_jobs(path, defaults={"cpus": 3})] == ["a", "b 1"]
    assert read_jobs(path, defaults={"cpus": 3})[0].cpus == 3.0


def test_json_job_lines(tmp_path: Path) -> None:
    text = '{"command": "echo {a}",\n "jobs": [\n  {"a": 1},\n  {"a": 2,\n   "cpus": "x"}]}\n'
    e = error(write(tmp_path, "jobs.json", text))
    assert (e.line, e.column) == (4, "cpus")
    e = error(write(tmp_path, "syntax.json", '{"jobs": [\n {"a": 1},\n {"a" 2}]}'))
    assert e.line == 3 and "not valid JSON" in str(e)
    e = error(write(tmp_path, "dup.json", '[\n{"command": "a",\n "command": "b"}]'))
    assert e.line == 2 and "twice" in str(e)


def test_nested_values_are_not_parameters(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.json", '[{"command": "x", "p": {"a": 1}}]'))
    assert e.column == "p" and "mapping" in str(e)
    e = error(write(tmp_path, "list.json", '[{"command": "x", "cpus": [1, 2]}]'))
    assert e.column == "cpus" and "not a list" in str(e)
    e = error(write(tmp_path, "item.json", '{"jobs": ["echo"]}'))
    assert e.column == "jobs[0]"


YAML = """\
command: process {plate} {well}
cpus: 2
env:
  A: "1"
jobs:
  - plate: 007
    well: A01
  - plate: P2
    well: 1.10
    memory: 2GB
    env: {B: x}
  - plate: P3
    well: yes
    timeout: soon
"""


def test_yaml_defaults_override_env_and_scalars_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.yaml", YAML.replace("soon", "2h"))
    first, second, third = read_jobs(path)
    assert first.command == "process 007 A01" and first.params == {"plate": "007", "well": "A01"}
    assert (second.command, second.memory, second.env) == ("process P2 1.10", 2 * 10**9,
                                                           {"A": "1", "B": "x"})
    assert (third.command, third.timeout, third.cpus) == ("process P3 yes", 7200.0, 2.0)


def test_yaml_error_lines(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.yml", YAML))
    assert (e.line, e.column) == (14, "timeout")
    assert str(e).startswith(f"{tmp_path / 'jobs.yml'}:14: column 'timeout'")
    e = error(write(tmp_path, "tmpl.yaml", YAML.replace("{well}", "{wel}").replace("soon", "1")))
    assert (e.line, e.column) == (6, "command")
    e = error(write(tmp_path, "syntax.yaml", "jobs:\n  - a: 1\n  - b: [\n"))
    assert e.line is not None and "not valid YAML" in str(e)
    e = error(write(tmp_path, "dup.yaml", "jobs:\n  - command: a\n    cpus: 1\n    cpus: 2\n"))
    assert e.line == 4 and "twice" in str(e)
    e = error(write(tmp_path, "top.yaml", "command: x\ncpus: lots\njobs:\n  - a: 1\n"))
    assert (e.line, e.column) == (2, "cpus")


def test_yaml_merge_keys(tmp_path: Path) -> None:
    text = "jobs:\n  - &base {command: 'echo {x}', x: 1, cpus: 2}\n  - <<: *base\n    x: 2\n"
    first, second = read_jobs(write(tmp_path, "jobs.yaml", text))
    assert (second.command, second.cpus) == ("echo 2", 2.0)


# --- JSON Lines ---------------------------------------------------------------------------


def test_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.jsonl", '{"f": "a b"}\n\n{"f": "c", "cpus": 2}\n')
    jobs = read_jobs(path, defaults={"command": "gzip {f}"})
    assert [(j.command, j.cpus) for j in jobs] == [("gzip 'a b'", 1.0), ("gzip c", 2.0)]
    e = error(write(tmp_path, "bad.ndjson", '{"command": "a"}\n\n{"command": \n'))
    assert e.line == 3 and "not valid JSON" in str(e)
    e = error(write(tmp_path, "arr.jsonl", '{"command": "a"}\n[1]\n'))
    assert e.line == 2


def test_iter_jobs_streams(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.csv", "command,cpus\na,1\nb,x\n")
    it = iter_jobs(path)
    assert next(it).command == "a"
    with pytest.raises(SpecError):
        next(it)


# --- --each -------------------------------------------------------------------------------


NASTY = ["plain.txt", "with space.txt", "it's.txt", 'say "hi".txt', "$(touch pwned)", "-n"]


def test_each_substitutes_quoted_arguments(tmp_path: Path) -> None:
    jobs = each_jobs("printf '%s\\n' {} >> out", NASTY)
    assert [j.params[""] for j in jobs] == NASTY
    for job in jobs:
        subprocess.run(["sh", "-c", job.command], cwd=tmp_path, check=True)
    assert (tmp_path / "out").read_text().splitlines() == NASTY
    assert not (tmp_path / "pwned").exists()


def test_each_without_placeholder_appends_like_xargs(tmp_path: Path) -> None:
    jobs = each_jobs("printf '%s\\n'", NASTY[:3], defaults={"cpus": 2})
    assert jobs[1].command == "printf '%s\\n' 'with space.txt'"
    assert jobs[0].cpus == 2.0
    out = subprocess.run(["sh", "-c", jobs[2].command], capture_output=True, text=True)
    assert out.stdout == "it's.txt\n"


def test_each_errors() -> None:
    with pytest.raises(SpecError, match="no arguments"):
        each_jobs("gzip {}", [])
    with pytest.raises(SpecError, match="unknown field"):
        each_jobs("gzip {file}", ["a"])
    with pytest.raises(SpecError, match="inside"):
        each_jobs("gzip '{}'", ["a"])


def test_job_without_any_command(tmp_path: Path) -> None:
    e = error(write(tmp_path, "jobs.json", '{"cpus": 2,\n "jobs": [\n  {"a": 1}]}'))
    assert (e.line, e.column) == (3, "command") and "no command" in str(e)


def test_not_utf8_and_wrong_top_level(tmp_path: Path) -> None:
    path = tmp_path / "jobs.csv"
    path.write_bytes(b"command\necho caf\xe9\n")
    assert "not UTF-8" in str(error(path))
    assert "expected a mapping" in str(error(write(tmp_path, "jobs.yaml", "hello\n")))


# --- the stored form -------------------------------------------------------------------------

SPECS = [
    JobSpec("true"),
    JobSpec('echo "é \\u2028\x01" \'x\'', env={"A": "b"}, params={"x": "y\n", "": "q"}),
    JobSpec("a", cpus=2), JobSpec("a", cpus=1), JobSpec("a", name="n", params={"p": "1"}),
    JobSpec("x", outputs=("a",), skip_if_done=True, min_size=3, stall_after=None),
    JobSpec("x", params={"n": 3, 4: "x"}),  # type: ignore[dict-item]  # not text: still JSON
]


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_to_json_is_compact_json_of_what_differs_from_the_defaults(spec: JobSpec) -> None:
    defaults = JobSpec("")
    expected = {"command": spec.command}
    for name in JobSpec.__dataclass_fields__:
        if name not in ("command", "env", "params") and getattr(spec, name) != getattr(defaults, name):
            expected[name] = getattr(spec, name)
    for name in ("env", "params"):
        if getattr(spec, name):
            expected[name] = {str(k): v for k, v in getattr(spec, name).items()}
    text = spec.to_json()
    assert json.loads(text) == json.loads(json.dumps(expected))
    assert text == json.dumps(expected, separators=(",", ":"), ensure_ascii=False)
    if all(isinstance(k, str) and isinstance(v, str) for k, v in spec.params.items()):
        assert JobSpec.from_json(text) == spec


def test_a_plain_row_makes_the_same_frozen_jobspec_as_the_constructor(tmp_path: Path) -> None:
    import dataclasses

    path = write(tmp_path, "jobs.csv", "command,sample\nprocess {sample},S 1\n")
    (got,) = read_jobs(path)
    assert type(got) is JobSpec
    assert got == JobSpec("process 'S 1'", params={"sample": "S 1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.command = "x"  # type: ignore[misc]
    path.write_text("command\na\0b\n")
    assert "NUL" in str(error(path))
    with pytest.raises(SpecError, match="Unicode"):  # as a JSON \\u escape can give
        make_job("a\udc80", {}, {}, {"p": "1"})
