"""Commands that change things: retry, cancel, and `worker`, which runs jobs."""

from __future__ import annotations

import logging
import re
from typing import Annotated

import typer

from jobfleet.cli.app import BlobsOpt, StoreOpt, app, connect_store, out, settings, worker_options
from jobfleet.cli.gateway import CaFileOpt, ServerOpt, TokenFileOpt, connect_worker
from jobfleet.cli.sandboxing import (
    AllowSandboxOpt,
    GpusOpt,
    InheritEnvOpt,
    KeepWorkspacesOpt,
    NetworkOpt,
    SandboxOpt,
    sandbox_options,
)
from jobfleet.errors import NotFound
from jobfleet.spec import parse_size
from jobfleet.store import Store

#: a run id as the stores accept one (see store.base); theirs and the executor's are hex
_RUN_ID = re.compile(r"[0-9a-z]+")

RefArg = Annotated[str, typer.Argument(metavar="RUN|JOB", help="A run id, or a job id RUN-N.")]


@app.command()
def retry(ref: RefArg, store: StoreOpt = None) -> None:
    """Requeue failed jobs (of a run, or one job) with a fresh attempt budget."""
    db = connect_store(settings(store))
    if "-" in ref:
        j = db.job(ref)
        n, run_id = db.retry(j.run_id, j.key), j.run_id
    else:
        run_id = db.run(ref).id
        n = db.retry(run_id)
    out.print(f"{n} job{'s' if n != 1 else ''} of run {run_id} queued again")
    if n:
        out.print(f"  run them with: jobfleet worker --run {run_id} --idle-exit 2")


@app.command()
def cancel(ref: RefArg, store: StoreOpt = None) -> None:
    """Cancel queued jobs now; their workers kill running ones within a second or two."""
    db = connect_store(settings(store))
    if "-" in ref:
        j = db.job(ref)
        done, asked = db.cancel(j.run_id, j.key)
    else:
        done, asked = db.cancel(db.run(ref).id)
    out.print(f"cancelled {done} queued job{'s' if done != 1 else ''}; "
              f"asked workers to stop {asked} running")


@app.command()
def worker(
    slots: Annotated[int | None, typer.Option("--slots", help="Jobs at once (CPU count).")] = None,
    cpus: Annotated[float | None, typer.Option(
        "--cpus", help="CPUs to offer jobs (max(slots, CPU count)).")] = None,
    memory: Annotated[str | None, typer.Option(
        "--memory", help="Memory to offer jobs, e.g. 8GiB (this machine's).")] = None,
    gpus: GpusOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="Serve only this run.")] = None,
    worker_id: Annotated[str | None, typer.Option(
        "--id", help="This worker's id (chosen at random).")] = None,
    idle_exit: Annotated[float | None, typer.Option(
        "--idle-exit", metavar="SECONDS", help="Exit after this long without work.")] = None,
    max_jobs: Annotated[int | None, typer.Option(
        "--max-jobs", help="Exit after taking this many jobs.")] = None,
    lease_seconds: Annotated[float | None, typer.Option(
        "--lease-seconds", help="Lease length; heartbeats renew it every third of it.")] = None,
    sandbox: SandboxOpt = "process",
    allow_sandbox: AllowSandboxOpt = None,
    inherit_env: InheritEnvOpt = False,
    keep_workspaces: KeepWorkspacesOpt = False,
    allow_network: NetworkOpt = True,
    warm_calls: Annotated[bool, typer.Option(
        "--warm-calls", help="Start a warm Python interpreter per slot at once, for a run of "
                             "Python calls (jobfleet.Executor's worker does).")] = False,
    spot_watch: Annotated[bool, typer.Option(
        "--spot-watch", envvar="JOBFLEET_SPOT_WATCH",
        help="On an EC2 spot instance: when the instance metadata announces a reclaim, hand "
             "every job back to the queue at once and exit.")] = False,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
    server: ServerOpt = None,
    token_file: TokenFileOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Take jobs from the store (or a `jobfleet server`) and run them; SIGTERM drains, twice releases."""
    from jobfleet.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker: %(message)s")
    s = settings(store, blobs, slots=slots, lease_seconds=lease_seconds)
    sandboxing = sandbox_options(sandbox, inherit_env, keep_workspaces, allow_sandbox,
                                 allow_network, gpus)
    db, blob_store = connect_worker(s, server, token_file, ca_file)
    run_id, waiting = _run_to_serve(db, run) if run else (None, False)
    opts = worker_options(
        s, cpus=cpus, memory=parse_size(memory) if memory else None,
        idle_exit=idle_exit, max_jobs=max_jobs, run_id=run_id, worker_id=worker_id,
        warm_calls=warm_calls,
        **sandboxing)
    w = Worker(db, blob_store, opts)
    out.print(f"worker {w.id}: {opts.slots} slots, sandbox {opts.sandbox}, store {db.url}"
              + (f", run {run_id}" if run_id else "")
              + (" (not stored yet: waiting for it)" if waiting else ""))
    watcher = None
    if spot_watch:
        from jobfleet.worker.spot import SpotWatcher

        watcher = SpotWatcher(w.interrupt).start()
    try:
        stats = w.run()
    finally:
        if watcher is not None:
            watcher.stop()
    done = ", ".join(f"{n} {k}" for k, n in sorted(stats.by_status.items())) or "no jobs"
    out.print(f"worker {w.id} stopped: {done}"
              + (f" ({w.interrupted})" if w.interrupted else ""))
    if waiting and not w.draining and db.pending(run_id or "") is None:  # gave up on it
        raise NotFound(f"no run {run_id} was stored in {db.url} while the worker waited for it",
                       hint="`jobfleet runs` lists the runs; check the id and --store")


def _run_to_serve(db: Store, ref: str) -> tuple[str, bool]:
    """(run id, not stored yet) for `worker --run REF`: a stored run, by id or unique prefix,
    or an id no run has yet. The worker then waits for it (until --idle-exit, or a minute):
    `jobfleet.Executor` starts its worker before the first call stores the run."""
    try:
        return db.run(ref).id, False
    except NotFound:
        ref = ref.strip().lower()
        # "latest", a malformed id, or a prefix of several runs: no run to wait for
        if ref in ("latest", "last") or not _RUN_ID.fullmatch(ref) or db._runs_by_prefix(ref):
            raise
        return ref, True
