"""`jobfleet run` and `jobfleet submit`: read a job file, store it as a run, and (run) work it."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from jobfleet.cli.app import (
    BlobsOpt,
    JsonOpt,
    StoreOpt,
    app,
    connect,
    connect_store,
    err,
    out,
    settings,
    worker_options,
)
from jobfleet.cli.fmt import dumps, size
from jobfleet.cli.sandboxing import (
    AllowSandboxOpt,
    GpusOpt,
    InheritEnvOpt,
    KeepWorkspacesOpt,
    NetworkOpt,
    SandboxOpt,
    sandbox_options,
)
from jobfleet.errors import SpecError
from jobfleet.spec import JobSpec
from jobfleet.store import Capacity, NewRun

Args = Annotated[
    list[str] | None,
    typer.Argument(metavar="FILE | ARGS...",
                   help="A job file (.csv .tsv .json .jsonl .yaml), or with --each the arguments."),
]
EachOpt = Annotated[
    str | None,
    typer.Option("--each", metavar="TEMPLATE",
                 help="Make one job per argument from TEMPLATE, `{}` standing for it."),
]
NameOpt = Annotated[str | None, typer.Option("--name", help="A name for the run.")]


def load_jobs(args: list[str] | None, each: str | None) -> tuple[list[JobSpec], str]:
    """The jobs the user asked for, all validated, and a description of where from."""
    from jobfleet.spec import each_jobs, read_jobs

    args = args or []
    if each is not None:
        if not args:
            raise SpecError("--each needs arguments to make jobs from",
                            hint="e.g. jobfleet run --each 'gzip -k {}' data/*.txt")
        return each_jobs(each, args), f"--each {each}"
    if len(args) != 1:
        raise SpecError(
            "give one job file" if not args else f"expected one job file, got {len(args)} arguments",
            hint="jobfleet run jobs.csv, or jobfleet run --each 'CMD {}' ARG...")
    path = Path(args[0])
    if not path.is_file():
        raise SpecError(f"no job file {path}", hint="check the path (relative to this folder)")
    return read_jobs(path), str(path)


def check_fits(jobs: list[JobSpec], total: Capacity, source: str) -> None:
    """Refuse, before storing anything, a job this machine could never run: it would wait forever."""
    for seq, job in enumerate(jobs, 1):
        if job.cpus > total.cpus or job.memory > total.memory or job.gpus > total.gpus:
            raise SpecError(
                f"job {seq} needs {job.cpus:g} cpus, {size(job.memory)} of memory and "
                f"{job.gpus} gpus; this machine offers {total.cpus:g} cpus, {size(total.memory)}"
                f" and {total.gpus} gpus", source=source,
                hint="lower what the job asks for, or `jobfleet submit` the file and start "
                     "`jobfleet worker` on machines big enough")


@app.command()
def submit(
    args: Args = None,
    each: EachOpt = None,
    name: NameOpt = None,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
    json: JsonOpt = False,
) -> None:
    """Store the jobs as a new run and return; workers pick them up (`jobfleet worker`)."""
    jobs, source = load_jobs(args, each)
    s = settings(store, blobs)
    db = connect_store(s)
    run_id = db.submit(NewRun(name=name, source=source, workdir=os.getcwd()), jobs)
    if json:
        out.print(dumps({"run": run_id, "jobs": len(jobs), "store": db.url}))
    else:
        out.print(f"run {run_id}: {len(jobs)} jobs queued in {db.url}")
        out.print(f"  start workers with: jobfleet worker --run {run_id}")


@app.command()
def run(
    args: Args = None,
    each: EachOpt = None,
    name: NameOpt = None,
    slots: Annotated[int | None, typer.Option(
        "--slots", help="Jobs at once (default: CPU count).")] = None,
    lease_seconds: Annotated[float | None, typer.Option(
        "--lease-seconds", help="How long a lease lasts without a heartbeat.")] = None,
    sandbox: SandboxOpt = "process",
    allow_sandbox: AllowSandboxOpt = None,
    inherit_env: InheritEnvOpt = False,
    keep_workspaces: KeepWorkspacesOpt = False,
    allow_network: NetworkOpt = True,
    gpus: GpusOpt = None,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Run every job on this machine with a live progress bar; exit 1 if any job failed."""
    from jobfleet.cli.watch import ProgressView, summary
    from jobfleet.worker import Worker, capacity

    jobs, source = load_jobs(args, each)
    s = settings(store, blobs, slots=slots, lease_seconds=lease_seconds)
    run_id = secrets.token_hex(4)
    options = worker_options(s, run_id=run_id, until_done=True, worker_id=f"w{run_id[:4]}-1",
                             **sandbox_options(sandbox, inherit_env, keep_workspaces,
                                               allow_sandbox, allow_network, gpus))
    check_fits(jobs, capacity(options), source)
    db, blob_store = connect(s)
    db.submit(NewRun(name=name, source=source, workdir=os.getcwd(), id=run_id), jobs)
    total = len(jobs)
    del jobs
    # the worker runs here, in this process: no second interpreter to start
    worker = Worker(db, blob_store, options)
    stopped = False

    def interrupted(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True
        worker.stop(now=signum == signal.SIGINT)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    out.print(f"run [bold]{run_id}[/]: {total} jobs, {s.slots} slots  [dim](store {db.url})[/]")
    with ProgressView(db.url, run_id, total) as view:
        worker.run(handle_signals=False)
    code = summary(db, blob_store, run_id, time.monotonic() - view.started)
    if stopped:
        err.print(f"stopped: running jobs went back to the queue. Resume with "
                  f"`jobfleet worker --run {run_id}`, or `jobfleet cancel {run_id}`.")
        code = 130
    raise typer.Exit(code)
