"""`jobfleet run` and `jobfleet submit`: read a job file, store it as a run, and (run) work it."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterable, Iterator
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
from jobfleet.cli.fleet import (
    FleetFlags,
    FleetOpt,
    HostsOpt,
    KeepAliveOpt,
    MaxWorkersOpt,
    ProviderOpt,
    SshKeyOpt,
    fleet_chosen,
)
from jobfleet.cli.fmt import dumps, escape, size
from jobfleet.cli.sandboxing import (
    AllowSandboxOpt,
    GpusOpt,
    InheritEnvOpt,
    KeepWorkspacesOpt,
    NetworkOpt,
    SandboxOpt,
    sandbox_options,
)
from jobfleet.config import Settings
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
    jobs, source = stream_jobs(args, each)
    return list(jobs), source


def stream_jobs(args: list[str] | None, each: str | None) -> tuple[Iterable[JobSpec], str]:
    """The jobs the user asked for, validated one by one as they are read (a bad one raises
    SpecError: submit them inside one transaction), and a description of where from."""
    from jobfleet.spec import each_jobs, iter_jobs

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
    return iter_jobs(path), str(path)


def fitting(jobs: Iterable[JobSpec], total: Capacity, source: str) -> Iterator[JobSpec]:
    """The jobs, refusing one this machine could never run (it would wait forever): submitted
    in one transaction, nothing is stored then."""
    for seq, job in enumerate(jobs, 1):
        if job.cpus > total.cpus or job.memory > total.memory or job.gpus > total.gpus:
            raise SpecError(
                f"job {seq} needs {job.cpus:g} cpus, {size(job.memory)} of memory and "
                f"{job.gpus} gpus; this machine offers {total.cpus:g} cpus, {size(total.memory)}"
                f" and {total.gpus} gpus", source=source,
                hint="lower what the job asks for, or `jobfleet submit` the file and start "
                     "`jobfleet worker` on machines big enough")
        yield job


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
    jobs, source = stream_jobs(args, each)
    s = settings(store, blobs)
    db = connect_store(s)
    run_id = db.submit(NewRun(name=name, source=source, workdir=os.getcwd()), jobs)
    total = db.run(run_id).total
    if json:
        out.print(dumps({"run": run_id, "jobs": total, "store": db.url}))
    else:
        out.print(f"run {run_id}: {total} jobs queued in {db.url}")
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
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
    max_workers: MaxWorkersOpt = None,
    keep_alive: KeepAliveOpt = None,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Run every job, here or on a --provider's workers, with a live progress bar; exit 1 if any failed."""
    from jobfleet.cli.watch import ProgressView, summary
    from jobfleet.worker import Worker, capacity

    jobs, source = stream_jobs(args, each)
    s = settings(store, blobs, slots=slots, lease_seconds=lease_seconds)
    run_id = secrets.token_hex(4)
    flags = FleetFlags(provider, fleet, max_workers, keep_alive, hosts, ssh_key)
    if fleet_chosen(flags):
        raise typer.Exit(run_on_fleet(jobs, source, name, s, run_id, flags))
    options = worker_options(s, run_id=run_id, until_done=True, worker_id=f"w{run_id[:4]}-1",
                             **sandbox_options(sandbox, inherit_env, keep_workspaces,
                                               allow_sandbox, allow_network, gpus))
    db, blob_store = connect(s)
    db.submit(NewRun(name=name, source=source, workdir=os.getcwd(), id=run_id),
              fitting(jobs, capacity(options), source))
    total = db.run(run_id).total
    # the worker runs here, in this process: no second interpreter to start
    worker = Worker(db, blob_store, options)
    stopped = False

    def interrupted(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True
        worker.stop(now=signum == signal.SIGINT)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    header = f"run [bold]{run_id}[/]: {total} jobs, {s.slots} slots  [dim](store {db.url})[/]"
    with ProgressView(db.url, run_id, total, header) as view:
        worker.run(handle_signals=False)
    code = summary(db, blob_store, run_id, time.monotonic() - view.started)
    if stopped:
        err.print(f"stopped: running jobs went back to the queue. Resume with "
                  f"`jobfleet worker --run {run_id}`, or `jobfleet cancel {run_id}`.")
        code = 130
    raise typer.Exit(code)


def run_on_fleet(jobs: Iterable[JobSpec], source: str, name: str | None, s: Settings,
                 run_id: str, flags: FleetFlags) -> int:
    """`run --provider P`: store the run, size a fleet to it until it is done, then take the
    fleet down and check that nothing is left. Returns the exit status."""
    from jobfleet.cli.fleet import (
        budget_for,
        cost_text,
        fleet_settings,
        keep_alive_note,
        launch_spec,
        open_provider,
        report_teardown,
        warn_if_unreachable,
    )
    from jobfleet.cli.watch import ProgressView, summary
    from jobfleet.fleet.autoscale import Autoscaler, FleetError, Step, down

    fs = fleet_settings(flags)
    provider = open_provider(fs)  # its settings are checked before anything is stored
    budget = budget_for(fs)  # and so are the caps
    db, blob_store = connect(s)
    warn_if_unreachable(fs, db, blob_store)
    db.submit(NewRun(name=name, source=source, workdir=os.getcwd(), id=run_id), jobs)
    total = db.run(run_id).total
    scaler = Autoscaler(db, provider, launch_spec(fs, s, db, blob_store, run_id),
                        fs.max_workers, keep_alive=fs.keep_alive, budget=budget)
    stopped = False

    def interrupted(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    note = keep_alive_note(fs)
    out.print(f"run [bold]{run_id}[/]: {total} jobs on fleet {fs.name} ({fs.provider}, up to"
              f" {fs.max_workers} workers)  [dim](store {db.url})[/]")
    failure = capped = None
    with ProgressView(db.url, run_id, total) as view:
        def show(step: Step) -> None:
            failed = f", {len(step.failed)} failed" if step.failed else ""
            cost = f", ${step.spent:.2f}" if budget.price.per_hour else ""
            view.note = (f"{len(step.live)} workers{failed}{cost}"
                         + (f"; {note}" if note else ""))

        try:
            capped = scaler.run(lambda: stopped or db.pending(run_id) == 0, on_step=show).stopped
        except FleetError as e:
            failure = e
    code = summary(db, blob_store, run_id, time.monotonic() - view.started)
    if failure is not None:
        err.print(f"[red]error:[/] {failure.message}\n  → {failure.hint}")
        code = max(code, 1)
    usage = db.usage(run_id)
    if usage:
        out.print(f"fleet cost: {cost_text(usage)}  [dim]{escape(budget.price.text())}[/]")
    if capped:
        cap = (f"max_total_cost ${budget.max_total_cost:g}" if capped == "budget"
               else f"absolute_timeout {budget.absolute_timeout:g}s")
        err.print(f"[red]run {run_id} stopped: {capped}[/] ({cap} would have been passed);"
                  f" its unfinished jobs stay queued. Go on with `jobfleet fleet autoscale"
                  f" --run {run_id}` once the cap allows it.")
        code = max(code, 1)
    if fs.keep_alive:
        out.print(note)
    else:
        before = provider.list()
        left = down(provider)
        report_teardown(fs, before, left)
        code = code or (1 if left else 0)
    if stopped:
        err.print(f"stopped: the fleet was taken down, unfinished jobs went back to the queue."
                  f" Resume with `jobfleet fleet autoscale --run {run_id}`, or"
                  f" `jobfleet cancel {run_id}`.")
        code = 130
    provider.close()
    return code
