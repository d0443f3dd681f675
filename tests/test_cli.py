"""Acceptance tests of the `jobfleet` command: real processes, a real SQLite file in tmp_path."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

from conftest import Jobfleet, wait_for, write_csv

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "skipped")
RUN_KEYS = {"run", "name", "source", "workdir", "created_at", "total", "state", "counts"}
JOB_KEYS = {"job", "run", "seq", "name", "state", "attempts", "max_attempts", "exit_code",
            "signal", "reason", "started_at", "finished_at", "worker", "peak_rss", "stalled_since",
            "command"}
WORKER_KEYS = {"worker", "host", "pid", "run", "state", "slots", "cpus", "memory", "gpus",
               "jobs_done", "started_at", "heartbeat_at"}


def counts(**nonzero: int) -> dict[str, int]:
    return {s: nonzero.get(s, 0) for s in STATES}


def run_id_of(stdout: str) -> str:
    m = re.search(r"^run ([0-9a-f]{8}):", stdout, re.M)
    assert m, f"no run id in:\n{stdout}"
    return m.group(1)


# --- 1. a big run with failures, then `retry` -------------------------------------------------

BAD = (7, 77, 177, 277, 477)


def test_run_reports_failures_then_retry_reruns_only_them(jf: Jobfleet, tmp_path: Path) -> None:
    command = ("if [ {bad} = yes ] && [ ! -e fixed.flag ]; then echo BOOM row {n} >&2; exit 3; fi;"
               " echo ok {n}")
    rows = [[command, n, "yes" if n in BAD else "no", 2, 0] for n in range(1, 501)]
    write_csv(tmp_path / "jobs.csv", ["command", "n", "bad", "max_attempts", "retry_delay"], rows)

    p = jf("run", "jobs.csv", "--slots", "2", check=1)
    run = run_id_of(p.stdout)
    assert re.search(r"\b495 succeeded\b", p.stdout), p.stdout
    assert re.search(r"\b5 failed\b", p.stdout), p.stdout
    for n in BAD:  # each failure is listed with its id and the line it printed to stderr
        assert re.search(rf"^\s*{run}-{n}\b.*exit code 3", p.stdout, re.M), p.stdout
        assert f"BOOM row {n}" in p.stdout, p.stdout
    assert "BOOM row 8" not in p.stdout

    status = jf.json("status", run)
    assert status["counts"] == counts(succeeded=495, failed=5)
    assert status["total"] == 500
    before = jf.jobs(run)
    assert {j for j, v in before.items() if v["state"] == "failed"} == {f"{run}-{n}" for n in BAD}
    assert all(before[f"{run}-{n}"]["attempts"] == 2 for n in BAD)  # max_attempts

    (tmp_path / "fixed.flag").touch()  # the cause, fixed
    p = jf("retry", run, check=0)
    assert "5 jobs" in p.stdout
    assert jf.json("status", run)["counts"] == counts(succeeded=495, queued=5)
    jf("worker", "--idle-exit", "2", "--slots", "2", check=0, timeout=30)

    after = jf.jobs(run)
    assert jf.json("status", run)["counts"] == counts(succeeded=500)
    for job, v in after.items():
        want = before[job]["attempts"] + (1 if job in {f"{run}-{n}" for n in BAD} else 0)
        assert v["attempts"] == want, (job, before[job], v)
        assert v["state"] == "succeeded"
    assert "ok 7" in jf("logs", f"{run}-7", check=0).stdout


# --- 2. exit 0, skip-if-done ------------------------------------------------------------------


def test_exit_0_and_skip_if_done(jf: Jobfleet, tmp_path: Path) -> None:
    (tmp_path / "a.out").write_text("old\n")
    (tmp_path / "b.out").write_text("old\n")
    write_csv(tmp_path / "jobs.csv",
              ["name", "command", "outputs", "skip_if_done", "min_size"], [
                  ["a", "echo ran > a.side; echo new > a.out", "a.out", "true", ""],
                  ["b", "echo ran > b.side; head -c 2000 /dev/zero > b.out", "b.out", "true",
                   "1KB"],
                  ["c", "echo ran > c.side", "", "", ""],
              ])
    p = jf("run", "jobs.csv", check=0)
    run = run_id_of(p.stdout)
    jobs = jf.jobs(run)
    assert jobs[f"{run}-1"]["state"] == "skipped"
    assert not (tmp_path / "a.side").exists(), "a skipped job's command ran"
    assert (tmp_path / "a.out").read_text() == "old\n"
    # b.out exists but is smaller than min_size: the job runs
    assert jobs[f"{run}-2"]["state"] == "succeeded"
    assert (tmp_path / "b.side").exists()
    assert (tmp_path / "b.out").stat().st_size == 2000
    assert jobs[f"{run}-3"]["state"] == "succeeded"
    assert jf.json("status", run)["counts"] == counts(succeeded=2, skipped=1)


# --- 3. bad job files are refused, nothing is stored ----------------------------------------


@pytest.mark.parametrize("command", ["run", "submit"])
def test_bad_row_refused_with_file_line_and_column(jf: Jobfleet, tmp_path: Path,
                                                   command: str) -> None:
    jf("run", "--each", "true", "x", check=0)  # an earlier run, so the list is not empty
    before = jf.json("runs")
    rows = [["echo {n} > {n}.out", n, "1GB"] for n in range(1, 10)]
    rows[5][2] = "12XB"  # file line 7: the header is line 1
    write_csv(tmp_path / "jobs.csv", ["command", "n", "memory"], rows)
    p = jf(command, "jobs.csv", check=2)
    assert "jobs.csv:7: column 'memory'" in p.stderr, p.stderr
    assert "'12XB' is not a size" in p.stderr, p.stderr
    assert jf.json("runs") == before
    assert not list(tmp_path.glob("*.out")), "a job ran"


def test_missing_command_column_and_unknown_field(jf: Jobfleet, tmp_path: Path) -> None:
    before = jf.json("runs")
    write_csv(tmp_path / "nocmd.csv", ["cmd", "n"], [["echo 1", 1]])
    p = jf("run", "nocmd.csv", check=2)
    assert "nocmd.csv:1" in p.stderr and "command" in p.stderr, p.stderr

    write_csv(tmp_path / "unknown.csv", ["command", "sample"],
              [["echo {sample}", "a"], ["echo {sample}", "b"], ["echo {smaple}", "c"]])
    p = jf("run", "unknown.csv", check=2)
    assert "unknown.csv:4" in p.stderr, p.stderr
    assert "{smaple}" in p.stderr and "{sample}" in p.stderr, p.stderr  # names it, suggests
    assert jf.json("runs") == before == []


# --- 8. logs ----------------------------------------------------------------------------------


def test_logs_latest_and_earlier_attempt(jf: Jobfleet, tmp_path: Path) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "max_attempts", "retry_delay"], [
        ["if [ -e tried ]; then echo second try; else touch tried; echo first try; exit 1; fi",
         2, 0],
    ])
    run = run_id_of(jf("run", "jobs.csv", check=0).stdout)
    assert jf("logs", f"{run}-1", check=0).stdout == "second try\n"
    assert jf("logs", f"{run}-1", "--attempt", "1", check=0).stdout == "first try\n"
    p = jf("logs", f"{run}-1", "--attempt", "3", check=2)
    assert "no attempt 3" in p.stderr


def test_logs_follow_streams_until_the_job_ends(jf: Jobfleet, tmp_path: Path) -> None:
    run = jf.submit("--each", "echo line one; while [ ! -e {} ]; do sleep 0.05; done; echo line two",
                    "release")
    worker = jf.popen("worker", "--idle-exit", "2", "--slots", "1")
    wait_for(lambda: "line one" in jf.log(run, 1), 15, what="the job to start")

    follow = jf.popen("logs", f"{run}-1", "--follow")
    seen: list[str] = []
    assert follow.stdout is not None
    reader = threading.Thread(target=lambda: seen.extend(iter(follow.stdout.readline, "")),
                              daemon=True)
    reader.start()
    wait_for(lambda: "line one\n" in seen, 10, what="`logs --follow` to print the first line")
    assert follow.poll() is None, "logs --follow returned while the job still runs"

    (tmp_path / "release").touch()
    assert follow.wait(15) == 0
    reader.join(5)
    assert seen == ["line one\n", "line two\n"]
    assert worker.wait(15) == 0


# --- 9. JSON outputs and id prefixes ---------------------------------------------------------


def test_json_outputs_have_the_documented_keys(jf: Jobfleet, tmp_path: Path) -> None:
    sub = jf.json("submit", "--each", "echo {}", "--name", "greet", "x", "y")
    assert set(sub) == {"run", "jobs", "store"}
    assert sub["jobs"] == 2 and str(jf.store_path) in sub["store"]
    run = sub["run"]
    runs = jf.json("runs")
    assert [r["run"] for r in runs] == [run]
    assert set(runs[0]) == RUN_KEYS
    assert runs[0]["name"] == "greet" and runs[0]["workdir"] == str(tmp_path)
    assert runs[0]["state"] == "active" and runs[0]["counts"] == counts(queued=2)

    jf("worker", "--idle-exit", "0.5", check=0)
    status = jf.json("status", run)
    assert set(status) == RUN_KEYS | {"cost", "usage"}
    assert status["cost"] == 0 and status["usage"] == []
    assert status["state"] == "finished" and status["counts"] == counts(succeeded=2)
    jobs = jf.json("jobs", run)
    assert [j["job"] for j in jobs] == [f"{run}-1", f"{run}-2"]
    assert all(set(j) == JOB_KEYS for j in jobs)
    assert jobs[0]["command"] == "echo x" and jobs[0]["exit_code"] == 0
    assert jf.json("jobs", run, "--state", "failed") == []
    workers = jf.json("workers")
    assert len(workers) == 1 and set(workers[0]) == WORKER_KEYS
    assert workers[0]["state"] == "stopped" and workers[0]["jobs_done"] == 2


def test_ids_by_unique_prefix_and_clear_errors_for_others(jf: Jobfleet) -> None:
    from jobfleet.spec import each_jobs
    from jobfleet.store import NewRun

    with jf.open_store() as db:  # two runs whose ids share a prefix
        db.submit(NewRun(id="abcd1111", workdir=str(jf.cwd)), each_jobs("echo {}", ["one"]))
        db.submit(NewRun(id="abcd2222", workdir=str(jf.cwd)), each_jobs("echo {}", ["two"]))

    assert jf.json("status", "abcd1")["run"] == "abcd1111"
    assert [j["job"] for j in jf.json("jobs", "abcd2")] == ["abcd2222-1"]
    p = jf("cancel", "abcd2-1", check=0)
    assert "cancelled 1 queued job" in p.stdout
    assert jf.jobs("abcd2222")["abcd2222-1"]["state"] == "cancelled"
    assert jf.jobs("abcd1111")["abcd1111-1"]["state"] == "queued"

    p = jf("status", "abcd", "--json", check=2)
    assert "abcd1111" in p.stderr and "abcd2222" in p.stderr and "more than one" in p.stderr
    assert p.stdout == ""
    p = jf("jobs", "ffff", check=2)
    assert "no run 'ffff'" in p.stderr, p.stderr
    p = jf("logs", "abcd-1", check=2)
    assert "more than one" in p.stderr, p.stderr
    p = jf("logs", "abcd1-9", check=2)
    assert "no job 9" in p.stderr, p.stderr
    p = jf("cancel", "abcd1-9", check=2)
    assert "no job 9" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_cancel_after_the_end_leaves_a_finished_run_finished(jf: Jobfleet) -> None:
    run = run_id_of(jf("run", "--each", "echo {}", "a", check=0).stdout)
    p = jf("cancel", run, check=0)
    assert "cancelled 0 queued jobs" in p.stdout and "stop 0 running" in p.stdout
    status = jf.json("status", run)
    assert status["counts"] == counts(succeeded=1)
    assert status["state"] == "finished", status


# --- 10. --each ---------------------------------------------------------------------------


def test_each_quick_form_with_awkward_names(jf: Jobfleet, tmp_path: Path) -> None:
    names = ["a b", "it's", 'say "hi"', "$HOME;x"]
    jf("run", "--each", "printf %s {} > {}.out", *names, check=0)
    for name in names:
        assert (tmp_path / f"{name}.out").read_text() == name
    assert sorted(p.name for p in tmp_path.glob("*.out")) == sorted(f"{n}.out" for n in names)


# --- 11. relative paths -------------------------------------------------------------------


def test_jobs_run_in_the_folder_run_was_started_from(jf: Jobfleet, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("hello from input\n")
    (tmp_path / "jobs").mkdir()
    write_csv(tmp_path / "jobs" / "jobs.csv", ["command"], [["cat input.txt > copy.txt"]])
    jf("run", "jobs/jobs.csv", check=0)
    assert (tmp_path / "copy.txt").read_text() == "hello from input\n"

    # submitted here, worked by a worker started somewhere else: still runs here
    other = tmp_path / "elsewhere"
    other.mkdir()
    run = jf.submit("--each", "cat input.txt > copy-{}.txt", "2")
    jf("worker", "--idle-exit", "0.5", cwd=other, check=0)
    assert jf.jobs(run)[f"{run}-1"]["state"] == "succeeded"
    assert (tmp_path / "copy-2.txt").read_text() == "hello from input\n"
    assert not list(other.iterdir())


# --- 12. slots ----------------------------------------------------------------------------


def test_slots_bound_how_many_jobs_run_at_once(jf: Jobfleet, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    command = "date +%s.%N > t/{n}.start; sleep 0.5; date +%s.%N > t/{n}.end"
    write_csv(tmp_path / "jobs.csv", ["command", "n"], [[command, n] for n in range(6)])
    jf("run", "jobs.csv", "--slots", "2", check=0)
    spans = [(float((tmp_path / f"t/{n}.start").read_text()),
              float((tmp_path / f"t/{n}.end").read_text())) for n in range(6)]
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running, most = 0, 0
    for _, step in points:
        running += step
        most = max(most, running)
    assert most == 2, spans


def test_missing_job_file_is_refused(jf: Jobfleet) -> None:
    p = jf("run", "nope.csv", check=2)
    assert "no job file nope.csv" in p.stderr, p.stderr


# --- what each attempt measured -----------------------------------------------------------


def test_duration_and_peak_memory_are_recorded(jf: Jobfleet) -> None:
    big = f"{sys.executable} -c 'x = bytearray(300 * 2**20); x[::4096] = b\"x\" * len(x[::4096])'"
    run = run_id_of(jf("run", "--each", "sh -c {}", big, "sleep 0.3", check=0).stdout)
    jobs = jf.jobs(run)
    hungry, sleepy = jobs[f"{run}-1"], jobs[f"{run}-2"]
    assert hungry["peak_rss"] >= 300 * 2**20
    # too small to tell apart from the worker's own size: not made up, just unknown
    assert sleepy["peak_rss"] is None
    took = _seconds(sleepy["finished_at"]) - _seconds(sleepy["started_at"])
    assert 0 <= took <= 5
    assert "MiB" in jf("jobs", run, check=0).stdout


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_run_refuses_a_job_this_machine_could_never_run(jf: Jobfleet, tmp_path: Path) -> None:
    write_csv(tmp_path / "jobs.csv", ["command", "memory"], [["true", "1GB"], ["true", "900TB"]])
    before = jf.json("runs")
    p = jf("run", "jobs.csv", check=2, timeout=30)
    assert "job 2 needs" in p.stderr and "this machine offers" in p.stderr, p.stderr
    assert jf.json("runs") == before


# --- the command line loads only the module of the command it runs ---------------------------


def test_each_command_works_with_only_its_own_module_loaded() -> None:
    """`jobfleet CMD` imports only CMD's module (jobfleet.cli.COMMANDS says which): each
    module must register the commands listed for it, and the list must name every command."""
    import subprocess

    probe = (
        "import sys, jobfleet.cli as cli\n"
        "cli.load_commands(sys.argv[1:])\n"
        "app = cli.app\n"
        "names = [c.name or c.callback.__name__ for c in app.registered_commands]\n"
        "names += [g.name for g in app.registered_groups]\n"
        "print(' '.join(names))\n"
    )

    def registered(*argv: str) -> set[str]:
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                             text=True, check=True).stdout
        return set(out.split())

    from jobfleet.cli import COMMANDS

    everything = registered("--help")
    assert everything == {name for names in COMMANDS.values() for name in names}
    for module, names in COMMANDS.items():
        loaded = registered(names[0], "--help")
        assert set(names) <= loaded, f"jobfleet {names[0]} does not load {module}'s commands"
        assert loaded < everything, f"jobfleet {names[0]} loaded every command module"


def test_version(jf: Jobfleet) -> None:
    from jobfleet import __version__

    assert jf("--version").stdout.strip() == f"jobfleet {__version__}"
