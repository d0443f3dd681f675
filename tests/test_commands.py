"""How a job's command is started: plain word lists directly, everything else by /bin/sh.

Whichever way a command starts, the user sees the shell's behaviour: the same output, exit
status and error messages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Jobfleet, pids_with, wait_for, write_csv
from jobfleet.sandbox.command import direct_argv


@pytest.mark.parametrize(("command", "argv"), [
    ("true", ["true"]),
    ("  gzip -k  data/part-1.txt ", ["gzip", "-k", "data/part-1.txt"]),
    ("python train.py --lr=0.1 --layers 2,3 host:80 a+b@c 5%", [
        "python", "train.py", "--lr=0.1", "--layers", "2,3", "host:80", "a+b@c", "5%"]),
    ("./run.sh 7", ["./run.sh", "7"]),
])
def test_plain_word_lists_start_without_a_shell(command: str, argv: list[str]) -> None:
    assert direct_argv(command) == [a.encode() for a in argv]


@pytest.mark.parametrize("command", [
    "echo a; echo b", "a && b", "a | b", "a > out", "a < in", "a &", "ls *.txt", "ls file?",
    "cat [ab]", "cat ~/x", "echo $HOME", "echo `date`", "echo 'a b'", 'echo "a"', "a\\ b",
    "a\nb", "run # comment", "(a)", "{ a; }", "! a",
    "A=1 cmd",  # an assignment for one command
    "cd /tmp", "exit 3", "export A", "set -e", "read x", ". ./env.sh", ": noop", "exec cmd",
    "echo -e x", "printf x", "pwd", "kill 1", "test -f x", "wait", "ulimit -n", "umask 77",
    "if", "for", "while", "time cmd",
    "héllo",  # a non-ASCII word: left to the shell and its locale
])
def test_anything_the_shell_would_interpret_goes_through_it(command: str) -> None:
    assert direct_argv(command) is None


def test_direct_and_shell_commands_behave_as_under_the_shell(jf: Jobfleet, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a script without #!: exec refuses it, the shell runs it
    (tmp_path / "nosheb.sh").write_text("echo script ran with $1\n")
    (tmp_path / "nosheb.sh").chmod(0o755)
    # a program found only on the job's own PATH
    (bin_dir / "jf-only-here").write_text("#!/bin/sh\necho found on the job PATH\n")
    (bin_dir / "jf-only-here").chmod(0o755)
    (tmp_path / "not-executable").write_text("echo never\n")
    job_path = f"{bin_dir}:{os.environ['PATH']}"
    write_csv(tmp_path / "jobs.csv", ["command", "env.PATH", "max_attempts"], [
        ["env", "", 1],                                 # 1 direct: sees the job variables
        ["./nosheb.sh hello", "", 1],                   # 2 direct, ENOEXEC: the shell runs it
        ["jf-no-such-program --flag", "", 1],           # 3 not found: 127 and sh's message
        ["jf-only-here", job_path, 1],                  # 4 the job's PATH is searched
        ["./not-executable", "", 1],                    # 5 not executable: 126
        ["echo -e x", "", 1],                           # 6 the shell's echo, not /bin/echo
    ])
    done = jf("run", "jobs.csv", check=1)
    jobs = {v["seq"]: v for v in jf.json("jobs", "latest")}
    run = jf.json("status")["run"]
    assert jobs[1]["state"] == "succeeded"
    assert f"JOBFLEET_JOB_ID={run}-1" in jf.log(run, 1)
    assert jobs[2]["state"] == "succeeded" and jf.log(run, 2) == "script ran with hello\n"
    assert jobs[3]["state"] == "failed" and jobs[3]["exit_code"] == 127, jobs[3]
    assert "jf-no-such-program: not found" in jf.log(run, 3)
    assert jobs[4]["state"] == "succeeded" and jf.log(run, 4) == "found on the job PATH\n"
    assert jobs[5]["state"] == "failed" and jobs[5]["exit_code"] == 126, jobs[5]
    assert "Permission denied" in jf.log(run, 5)
    assert jf.log(run, 6) == "-e x\n"  # dash's echo prints -e; /bin/echo would not
    assert "2 failed" in done.stdout


def test_a_plain_command_runs_as_itself(jf: Jobfleet, tmp_path: Path, marker: str) -> None:
    """`ps` shows the job's own program, with no shell wrapped around it."""
    write_csv(tmp_path / "jobs.csv", ["command", "timeout", "max_attempts"],
              [[f"sleep {marker}", "1s", 1]])
    runner = jf.popen("run", "jobs.csv")
    [pid] = wait_for(lambda: pids_with(marker), 15, what="the job's process")
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{marker}\0".encode()
    out, err = runner.communicate(timeout=30)
    assert runner.returncode == 1 and "timed out" in out, (out, err)
    wait_for(lambda: not pids_with(marker), 3, what="the timed-out job to be gone")
