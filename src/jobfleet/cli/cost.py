"""`jobfleet cost estimate FILE`: time a few of the file's jobs here, then say how long the
whole file takes on the chosen fleet and what it costs."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Annotated

import typer

from jobfleet.cli.app import JsonOpt, app, err, out
from jobfleet.cli.fleet import (
    FleetFlags,
    FleetOpt,
    HostsOpt,
    MaxWorkersOpt,
    ProviderOpt,
    SshKeyOpt,
    fleet_settings,
)
from jobfleet.cli.fmt import dumps, duration, escape
from jobfleet.cli.run import Args, EachOpt, load_jobs
from jobfleet.config import load_settings
from jobfleet.spec import JobSpec

cost_app = typer.Typer(help="What a run costs: estimates from sampled jobs.",
                       no_args_is_help=True)
app.add_typer(cost_app, name="cost")


def sample(jobs: list[JobSpec], k: int) -> list[tuple[int, JobSpec]]:
    """`k` jobs spread evenly over the file (first, last and between), with their numbers."""
    if k >= len(jobs):
        return list(enumerate(jobs, 1))
    picks = sorted({round(i * (len(jobs) - 1) / max(1, k - 1)) for i in range(k)})
    return [(i + 1, jobs[i]) for i in picks]


def time_job(job: JobSpec) -> float:
    """Run one job here, as a worker would start it, and return how long it took."""
    start = time.monotonic()
    subprocess.run(["/bin/sh", "-c", job.command], cwd=job.workdir or os.getcwd(),
                   env={**os.environ, **job.env}, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=job.timeout,
                   check=False)
    return time.monotonic() - start


@cost_app.command("estimate")
def estimate(
    args: Args = None,
    each: EachOpt = None,
    sample_size: Annotated[int, typer.Option(
        "--sample", metavar="K", help="Time K of the jobs here first (they really run).")] = 3,
    seconds: Annotated[float | None, typer.Option(
        "--seconds", help="Say how long a job takes instead of timing any.")] = None,
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
    max_workers: MaxWorkersOpt = None,
    json: JsonOpt = False,
) -> None:
    """Expected wall time and cost of a job file on a fleet of --max-workers workers."""
    from jobfleet.fleet.cost import Estimate, money, worker_price

    jobs, source = load_jobs(args, each)
    fs = fleet_settings(FleetFlags(provider, fleet, max_workers, hosts=hosts, ssh_key=ssh_key))
    slots = fs.slots or load_settings().slots
    price = worker_price(fs.provider, fs.provider_settings(), fs.price, fs.prices)
    timed: list[tuple[int, float]] = []
    if seconds is None:
        picked = sample(jobs, max(1, sample_size))
        if not json:
            err.print(f"timing {len(picked)} of {len(jobs)} jobs here (they really run) ...")
        timed = [(seq, time_job(job)) for seq, job in picked]
        seconds = sum(t for _, t in timed) / len(timed)
    e = Estimate(len(jobs), seconds, fs.max_workers, slots, price)
    if json:
        out.print(dumps({"jobs": e.jobs, "seconds_per_job": e.seconds, "workers": e.workers,
                         "slots": e.slots, "wall_seconds": e.wall,
                         "worker_hours": e.worker_hours, "price_per_worker_hour": price.per_hour,
                         "price_source": price.source, "instance_type": price.label,
                         "cost": e.cost, "sampled": [{"job": s, "seconds": t} for s, t in timed]}))
        return
    for seq, took in timed:
        out.print(f"  job {seq}: {duration(took)}")
    out.print(f"{source}: {e.jobs} jobs of about {duration(e.seconds)} each")
    out.print(f"on {e.workers} {fs.provider} workers of {e.slots} slots: about"
              f" {duration(e.wall)}, {e.worker_hours:.2f} worker-hours")
    if e.cost is None:
        out.print(f"cost: unknown, {escape(price.text())}")
    else:
        out.print(f"cost: about {money(e.cost)}  [dim]{escape(price.text())}[/]")
    if fs.max_total_cost is not None and e.cost is not None and e.cost > fs.max_total_cost:
        out.print(f"[yellow]that is over max_total_cost ${fs.max_total_cost:g}: the run would"
                  " be stopped before the end[/]")
