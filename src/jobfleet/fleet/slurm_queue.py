"""What Slurm's commands say, parsed: job states and their phases, the `squeue` and `sacct`
rows of array tasks, exit statuses, and Slurm's way of writing time limits."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Slurm job states -> phases (states not listed count as launching)
READY_STATES = frozenset({"RUNNING", "RESIZING", "SIGNALING"})
STOPPED_STATES = frozenset({"COMPLETING", "COMPLETED", "CANCELLED", "PREEMPTED", "REVOKED",
                            "SPECIAL_EXIT", "STAGE_OUT"})
FAILED_STATES = {
    "FAILED": "failed",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "TIMEOUT": "reached its time limit",
    "DEADLINE": "reached its deadline",
    "OUT_OF_MEMORY": "out of memory",
}
#: pending reasons that only mean "waiting its turn"
ORDINARY_WAITS = frozenset({"", "None", "Priority", "Resources", "BeginTime"})
#: squeue -O fields, each padded to its width and closed by "|"
FIELDS = (("ArrayJobID", 20), ("ArrayTaskID", 20), ("State", 20), ("exit_code", 12),
          ("NodeList", 120), ("Comment", 60), ("Reason", 200))
#: an array task's id: ARRAYJOB_TASK
TASK_ID = re.compile(r"(\d+)_(\d+)\Z")


def slurm_time(seconds: float) -> str:
    """`sbatch --time` for `seconds`, rounded up to a whole minute: `D-HH:MM:00`."""
    minutes = max(1, math.ceil(seconds / 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:00"


def drain_lead(time_limit: float) -> int:
    """Seconds before the time limit at which Slurm asks a worker to drain (its signal timer
    ticks about once a minute, so never less than 60)."""
    return int(max(60, min(300, time_limit / 10)))


def exit_status(raw: str) -> tuple[int | None, int | None]:
    """(exit code, signal) from squeue's raw wait status (`768`) or sacct's `3:0`."""
    raw = raw.strip()
    if ":" in raw:
        code, _, sig = raw.partition(":")
        return (int(code) if code.isdigit() else None, int(sig) if sig.isdigit() and sig != "0"
                else None)
    if not raw.isdigit():
        return None, None
    status = int(raw)
    return (status >> 8) & 0xFF, (status & 0x7F) or None


@dataclass(frozen=True, slots=True)
class Task:
    """One array task as squeue or sacct shows it."""

    array_job: str
    task: str
    state: str
    exit: str = ""
    nodes: str = ""
    comment: str = ""
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.array_job}_{self.task}"

    def tag(self, key: str) -> str | None:
        """A `key=value` of the comment jobfleet gave the job (`jobfleet run=... config=...`)."""
        words = self.comment.split()
        if not words or words[0] != "jobfleet":
            return None
        return next((w.split("=", 1)[1] for w in words[1:] if w.startswith(key + "=")), None)


def parse_squeue(text: str) -> list[Task]:
    """Rows of `squeue -O` with the `FIELDS` (each closed by `|`)."""
    tasks = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < len(FIELDS) or not cells[0].isdigit() or not cells[1].isdigit():
            continue  # a blank line, or a task range squeue did not expand
        job, task, state, exit_code, nodes, comment, reason = cells[:len(FIELDS)]
        tasks.append(Task(job, task, state.split()[0] if state else "", exit_code, nodes,
                          comment, reason))
    return tasks


def parse_sacct(text: str) -> list[Task]:
    """Rows of `sacct --parsable2 --format JobID,State,ExitCode,NodeList,Comment`."""
    tasks = []
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) < 5 or not (m := TASK_ID.match(cells[0])):
            continue  # a step (123_4.batch) or a job that is not an array task
        state = cells[1].split()[0] if cells[1] else ""  # "CANCELLED by 1000"
        tasks.append(Task(m.group(1), m.group(2), state, cells[2], cells[3], cells[4]))
    return tasks
