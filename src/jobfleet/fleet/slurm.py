"""The `slurm` provider: workers as the tasks of `sbatch --array` jobs named `jobfleet-FLEET`,
read back with `squeue` (and `sacct` where the cluster keeps accounting), stopped with
`scancel`.

Each launch is one array job; its task i is one worker, `FLEET-ARRAYJOB_i`, whose output goes
to `log_dir/FLEET-ARRAYJOB_i.log`. The batch script runs the optional setup, then
`exec python -m jobfleet worker ...`. The store's URL and credentials travel in the
environment of `sbatch` (exported to the job), never in a command line or the script.
Slurm clusters share a filesystem between the login and compute nodes, so by default the
workers run the interpreter this process runs, and write their logs where this one reads them.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar, cast

from jobfleet.errors import ConfigError, JobfleetError
from jobfleet.fleet.base import (
    CREDENTIAL_VARIABLES,
    FAILED,
    LAUNCHING,
    READY,
    STOPPED,
    LaunchSpec,
    Machine,
    OnChange,
    Provider,
    option,
)
from jobfleet.fleet.local import tail  # the last lines of a log file
from jobfleet.fleet.slurm_queue import (
    FAILED_STATES,
    FIELDS,
    ORDINARY_WAITS,
    READY_STATES,
    STOPPED_STATES,
    TASK_ID,
    Task,
    drain_lead,
    exit_status,
    parse_sacct,
    parse_squeue,
    slurm_time,
)
from jobfleet.spec.model import parse_duration

#: the settings of [providers.slurm]
SETTINGS = ("partition", "account", "time_limit", "sbatch_args", "python", "log_dir", "setup",
            "stop_grace")
#: sbatch options the provider sets itself: list() and the workers depend on them
_OWN_OPTIONS = ("-J", "--job-name", "-a", "--array", "-o", "--output", "--export")
#: sacct is asked about jobs that started this long ago at most, seconds
SACCT_WINDOW = 3600
#: how long terminate waits for cancelled jobs to leave the queue, seconds
CANCEL_WAIT = 30.0
#: launches whose every worker failed, while none of the fleet runs, before launch refuses
FAILED_LAUNCHES = 2
_COMMAND_TIMEOUT = 60.0
T = TypeVar("T")


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("it must be a non-empty string")
    return value.strip()


def _word(value: object) -> str:
    text = _text(value)
    if any(c.isspace() for c in text):
        raise ValueError("it must be one word (no spaces)")
    return text


def _time_limit(value: object) -> float:
    seconds = parse_duration(value)
    if seconds < 60:
        raise ValueError("it must be at least a minute (Slurm counts time limits in minutes)")
    return seconds


def _args(value: object) -> list[str]:
    if isinstance(value, str):
        args = shlex.split(value)
    elif isinstance(value, list | tuple) and all(isinstance(a, str) for a in value):
        args = list(value)
    else:
        raise ValueError("it must be a list of strings or one string of arguments")
    for a in args:
        name = a.split("=", 1)[0]
        if name in _OWN_OPTIONS or (name[:2] in _OWN_OPTIONS and not name.startswith("--")):
            raise ValueError(f"{name[:2] if not name.startswith('--') else name} is set by"
                             " jobfleet itself (the job name, array, output and --export)")
    return args


def _directory(value: object) -> Path:
    return Path(_text(value)).expanduser().absolute()


class SlurmProvider(Provider):
    """Workers as Slurm array tasks, on whatever nodes the scheduler gives them."""

    name = "slurm"

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        super().__init__(fleet, settings, on_change)
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"providers.slurm has no setting {unknown[0]!r}",
                              hint=f"its settings are: {', '.join(SETTINGS)}")

        def get(name: str, kind: Callable[[object], T], default: T) -> T:
            return cast(T, option(self.name, settings, name, kind, default))

        self.partition: str | None = get("partition", _word, None)
        self.account: str | None = get("account", _word, None)
        self.time_limit = get("time_limit", _time_limit, 3600.0)
        self.sbatch_args: list[str] = get("sbatch_args", _args, [])
        self.python = get("python", _text, sys.executable)
        self.log_dir = get("log_dir", _directory, Path.cwd() / ".jobfleet" / "slurm")
        self.setup: str | None = get("setup", _text, None)
        self.stop_grace = get("stop_grace", parse_duration, 40.0)
        self.job_name = f"jobfleet-{self.fleet}"
        self.user = str(os.getuid())
        for command in ("sbatch", "squeue", "scancel"):
            if shutil.which(command) is None:
                raise ConfigError(
                    f"providers.slurm: the Slurm command {command!r} is not on PATH",
                    hint="run jobfleet on a login node of the cluster, where `sbatch --version`"
                         " works (or install the Slurm client: apt-get install slurm-client,"
                         " with the cluster's slurm.conf and munge key)")
        self._accounting: bool | None = None  # does sacct answer? (None: not asked yet)
        self._seen: dict[str, str] = {}  # machine id -> the phase last reported

    # -- commands --------------------------------------------------------------------------

    def _command(self, args: list[str], *, input: str | None = None,
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(args, input=input, env=env, capture_output=True, text=True,
                                  timeout=_COMMAND_TIMEOUT,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return subprocess.CompletedProcess(args, 255, "", f"{args[0]}: {e}")

    def _squeue(self) -> list[Task]:
        fields = ",".join(f"{name}:{width}|" for name, width in FIELDS)
        command = ["squeue", "--noheader", "--array", "--states=all", f"--user={self.user}",
                   f"--name={self.job_name}", f"--Format={fields}"]
        for pause in (1.0, 3.0, None):  # slurmctld may be busy or restarting: try thrice
            done = self._command(command)
            if done.returncode == 0:
                return parse_squeue(done.stdout)
            if pause is not None:
                time.sleep(pause)
        raise JobfleetError(f"squeue failed: {' '.join(done.stderr.split())}",
                            hint="check that `squeue` works here (slurmctld reachable, munge"
                                 " running: see docs/providers/slurm.md)")

    def _sacct(self) -> list[Task]:
        """Tasks that ended in the last hour, where the cluster keeps accounting."""
        if self._accounting is False or shutil.which("sacct") is None:
            return []
        done = self._command(["sacct", "--noheader", "--parsable2", "--allocations",
                              f"--user={self.user}", f"--name={self.job_name}",
                              f"--starttime=now-{SACCT_WINDOW}",
                              "--format=JobID,State,ExitCode,NodeList,Comment"])
        self._accounting = done.returncode == 0
        return parse_sacct(done.stdout) if done.returncode == 0 else []

    # -- the interface ---------------------------------------------------------------------

    def launch(self, n: int, spec: LaunchSpec) -> list[Machine]:
        if n <= 0:
            return []
        refused = self._failing(self.config(spec))
        if refused:
            return self._failed_launch(n, spec, refused)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return self._failed_launch(n, spec, f"cannot make log_dir {self.log_dir}: {e}")
        command = ["sbatch", "--parsable", f"--array=0-{n - 1}", f"--job-name={self.job_name}",
                   "--export=ALL", f"--time={slurm_time(self.time_limit)}",
                   f"--signal=B:TERM@{drain_lead(self.time_limit)}",
                   f"--output={self.log_dir}/{self.fleet}-%A_%a.log",
                   f"--comment=jobfleet run={spec.run_id or '*'} config={self.config(spec)}",
                   f"--cpus-per-task={math.ceil(spec.cpus) if spec.cpus else spec.slots}"]
        if self.partition:
            command.append(f"--partition={self.partition}")
        if self.account:
            command.append(f"--account={self.account}")
        if spec.memory:
            command.append(f"--mem={math.ceil(spec.memory / 2**20)}M")
        if spec.gpus:
            command.append(f"--gres=gpu:{spec.gpus}")
        command += self.sbatch_args
        # the store's URL (password and all) reaches the job through sbatch's environment,
        # which --export=ALL hands over: no command line or script holds it. The rest of this
        # shell's environment goes along, as Slurm users expect, less jobfleet's settings and
        # credentials: the workers get those of the launch only
        env = {k: v for k, v in os.environ.items()
               if k not in CREDENTIAL_VARIABLES and not k.startswith("JOBFLEET_")}
        env.update(spec.worker_env())
        done = self._command(command, input=self.script(spec), env=env)
        job = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not job.isdigit():
            why = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
            return self._failed_launch(n, spec, f"sbatch refused the workers: {why}")
        machines = [Machine(f"{job}_{i}", self.name, self.fleet, LAUNCHING,
                            f"{self.fleet}-{job}_{i}", run_id=spec.run_id) for i in range(n)]
        for m in machines:
            self._seen[m.id] = m.phase
            self.on_change(m)
        return machines

    def config(self, spec: LaunchSpec) -> str:
        """A short digest of what decides whether a worker can start: the settings, the
        version wanted, and what each worker asks Slurm for."""
        what = [self.setup or "", self.python, self.partition or "", self.account or "",
                *self.sbatch_args, spec.version, str(spec.cpus), str(spec.slots),
                str(spec.memory), str(spec.gpus)]
        return hashlib.sha256("\0".join(what).encode()).hexdigest()[:10]

    def _failing(self, config: str) -> str | None:
        """Why launching more is pointless: the last `FAILED_LAUNCHES` array jobs of the fleet
        made with this `config` failed, every task, and none of its workers runs (a bad
        setup, python missing). Changed settings are tried afresh; the queue forgets ended
        jobs after a while (MinJobAge), and with them this verdict."""
        tasks = self._squeue()
        if any(t.state in READY_STATES for t in tasks):
            return None
        jobs: dict[str, list[Task]] = {}
        for t in tasks:
            if t.tag("config") == config:
                jobs.setdefault(t.array_job, []).append(t)
        ended = [ts for _, ts in sorted(jobs.items(), key=lambda kv: int(kv[0]))
                 if all(t.state in STOPPED_STATES or t.state in FAILED_STATES for t in ts)]
        last = ended[-FAILED_LAUNCHES:]
        if len(last) < FAILED_LAUNCHES or not all(
                t.state in FAILED_STATES for ts in last for t in ts):
            return None
        example = self._machine(last[-1][0], "squeue")
        return (f"the last {FAILED_LAUNCHES} launches of fleet {self.fleet} failed, every"
                f" worker ({example.id}: {example.reason}); not submitting more until that is"
                f" fixed (their logs are in {self.log_dir})")

    def _failed_launch(self, n: int, spec: LaunchSpec, reason: str) -> list[Machine]:
        stamp = int(time.time())
        machines = [Machine(f"sbatch-{stamp}-{i}", self.name, self.fleet, FAILED,
                            run_id=spec.run_id, reason=reason) for i in range(n)]
        for m in machines:
            self.on_change(m)
        return machines

    def script(self, spec: LaunchSpec) -> str:
        """The batch script of a launch (no secrets: those are in the job's environment)."""
        placeholder = "\0worker\0"
        args = " ".join('"$worker"' if a == placeholder else shlex.quote(a)
                        for a in spec.worker_args(placeholder))
        python = shlex.quote(self.python)
        lines = [
            "#!/bin/bash",
            f"# a jobfleet worker of fleet {self.fleet}, one per array task",
            f'worker="{self.fleet}-${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"',
            'echo "jobfleet: worker $worker on $(hostname), Slurm job $SLURM_JOB_ID,'
            ' $(date -u +%Y-%m-%dT%H:%M:%SZ)"',
        ]
        if self.setup:
            lines += [
                'echo "jobfleet: running the setup"',
                "trap 'status=$?; echo \"jobfleet: error: setup failed (exit status $status)"
                " on $(hostname): the worker did not start\" >&2' EXIT",
                "set -e",
                self.setup,
                "set +e",
                "trap - EXIT",
            ]
        lines += [
            f"if ! command -v {python} >/dev/null 2>&1; then",
            '  echo "jobfleet: error: python not found on $(hostname):"'
            f' {python} "(set python in [providers.slurm] to an interpreter the nodes see)" >&2',
            "  exit 97",
            "fi",
        ]
        if spec.version:
            # the workers must run the version that submitted (the store's schema is its)
            want = shlex.quote(spec.version)
            lines += [
                f"have=$({python} -c 'import jobfleet; print(jobfleet.__version__)' 2>&1)",
                f'if [ "$have" != {want} ]; then',
                f'  echo "jobfleet: error: jobfleet" {want} "is needed but"'
                f' {python} "on $(hostname) has: ${{have##*$\'\\n\'}}'
                ' (install it there, or set python in [providers.slurm])" >&2',
                "  exit 98",
                "fi",
            ]
        lines.append(f"exec {python} -m jobfleet worker {args}")
        return "\n".join(lines) + "\n"

    def _machine(self, t: Task, seen_by: str) -> Machine:
        log = self.log_dir / f"{self.fleet}-{t.id}.log"
        run_id = t.tag("run")
        run_id = None if run_id in (None, "*") else run_id
        host = t.nodes if t.nodes and t.nodes not in ("(null)", "None assigned") else None
        worker = f"{self.fleet}-{t.id}"
        if t.state in READY_STATES:
            return Machine(t.id, self.name, self.fleet, READY, worker, host, run_id)
        if t.state in FAILED_STATES:
            lines = tail(log)
            return Machine(t.id, self.name, self.fleet, FAILED, worker, host, run_id,
                           reason=self._failure(t, lines, seen_by), log_tail=lines)
        if t.state in STOPPED_STATES:
            why = {"CANCELLED": "cancelled", "PREEMPTED": "preempted",
                   "COMPLETED": "its worker exited"}.get(t.state, t.state.lower())
            return Machine(t.id, self.name, self.fleet, STOPPED, worker, host, run_id,
                           reason=why, log_tail=tail(log))
        waiting = None if t.reason in ORDINARY_WAITS else f"{t.state.lower()} ({t.reason})"
        return Machine(t.id, self.name, self.fleet, LAUNCHING, worker, host, run_id,
                       reason=waiting)

    def _failure(self, t: Task, lines: tuple[str, ...], seen_by: str) -> str:
        """Why a task failed: the state's meaning, the exit status, and the script's own
        word for it when it left one in the log (setup failed, python not found)."""
        why = FAILED_STATES[t.state]
        code, sig = exit_status(t.exit)
        if t.state == "FAILED":
            why = (f"killed by signal {sig}" if sig else
                   f"exited with status {code}" if code is not None else "failed")
        elif t.state == "TIMEOUT":
            why = f"reached its time limit ({slurm_time(self.time_limit)})"
        own = [line.removeprefix("jobfleet: error: ") for line in lines
               if line.startswith("jobfleet: error: ")]
        if own:
            why = f"{why}: {own[-1]}"
        return f"{why} (Slurm state {t.state}, from {seen_by})"

    def list(self) -> list[Machine]:
        machines = {t.id: self._machine(t, "squeue") for t in self._squeue()}
        for t in self._sacct():
            if t.id not in machines and t.state in FAILED_STATES:
                machines[t.id] = self._machine(t, "sacct")
        found = sorted(machines.values(), key=lambda m: tuple(map(int, m.id.split("_"))))
        for m in found:
            if self._seen.get(m.id) != m.phase:
                self.on_change(m)
        self._seen = {m.id: m.phase for m in found}
        return found

    def terminate(self, ids: Sequence[str]) -> None:
        """Pending workers are cancelled at once; running ones get SIGTERM (they drain), and
        whatever is left after `stop_grace` is cancelled. Returns when none is live."""
        wanted = {i for i in ids if TASK_ID.match(i)}
        if not wanted:
            return
        now = {m.id: m for m in self.list() if m.id in wanted}
        pending = [i for i, m in now.items() if m.phase == LAUNCHING]
        running = [i for i, m in now.items() if m.phase == READY]
        if pending:
            self._scancel(pending)
        if running:
            # the batch shell is the worker (exec), so --batch signals it and not its jobs;
            # scancel may linger a few seconds after a quick exit, so it is not waited for
            signaller = subprocess.Popen(
                ["scancel", "--batch", "--signal=TERM", f"--user={self.user}",
                 f"--name={self.job_name}", *running],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            threading.Thread(target=signaller.wait, daemon=True).start()
            left = self._wait_until_gone(set(running), self.stop_grace)
            if left:
                self._scancel(sorted(left))
        self._wait_until_gone(set(now), CANCEL_WAIT)

    def _scancel(self, ids: Sequence[str]) -> None:
        self._command(["scancel", f"--user={self.user}", f"--name={self.job_name}", *ids])

    def _wait_until_gone(self, ids: set[str], wait: float) -> set[str]:
        """Poll until none of `ids` is pending or running; those still are."""
        until = time.monotonic() + wait
        while True:
            live = {t.id for t in self._squeue() if t.id in ids
                    and t.state not in STOPPED_STATES and t.state not in FAILED_STATES}
            if not live or time.monotonic() >= until:
                return live
            time.sleep(0.25)

    def describe(self) -> dict[str, object]:
        return {"provider": self.name, "fleet": self.fleet, "job_name": self.job_name,
                "partition": self.partition or "(the cluster's default)",
                "account": self.account or "(your default)",
                "time_limit": slurm_time(self.time_limit), "log_dir": str(self.log_dir),
                "python": self.python, "setup": bool(self.setup)}
