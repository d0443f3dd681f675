"""`jobfleet fleet up|down|status|autoscale`, and the fleet options `run` shares."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from jobfleet.cli.app import BlobsOpt, JsonOpt, StoreOpt, app, connect, err, out, settings
from jobfleet.cli.fmt import ago, dumps, escape
from jobfleet.errors import ConfigError

if TYPE_CHECKING:
    from jobfleet.blobs import Blobs
    from jobfleet.config import Settings
    from jobfleet.fleet import LaunchSpec, Machine, Provider
    from jobfleet.fleet.cost import Budget
    from jobfleet.fleet.settings import FleetSettings
    from jobfleet.store import Store, Usage

fleet_app = typer.Typer(help="Start, watch and stop the workers of a fleet.",
                        no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")

ProviderOpt = Annotated[str | None, typer.Option(
    "--provider", help="Where workers start: local, ssh, slurm, aws or kubernetes"
    " (env JOBFLEET_PROVIDER).")]
FleetOpt = Annotated[str | None, typer.Option(
    "--fleet", help="The fleet's name (default: default).")]
HostsOpt = Annotated[str | None, typer.Option(
    "--hosts", metavar="USER@HOST[:PORT],...", help="ssh: the hosts to start workers on.")]
SshKeyOpt = Annotated[str | None, typer.Option(
    "--ssh-key", metavar="FILE", help="ssh: the private key to log in with.")]
MaxWorkersOpt = Annotated[int | None, typer.Option(
    "--max-workers", help="At most this many workers (default 4).")]
KeepAliveOpt = Annotated[bool | None, typer.Option(
    "--keep-alive", help="Leave workers running when the work is done (debugging).")]


#: variables of the controller's environment that workers get too
_PASSED_ON = ("PGPASSWORD", "PGSSLMODE", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True, slots=True)
class FleetFlags:
    """The fleet options as given on one command line (None: not given)."""

    provider: str | None = None
    fleet: str | None = None
    max_workers: int | None = None
    keep_alive: bool | None = None
    hosts: str | None = None
    ssh_key: str | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.provider, self.hosts, self.ssh_key))


def fleet_chosen(flags: FleetFlags) -> bool:
    """Does this command run on a fleet: a provider given by a flag, JOBFLEET_PROVIDER or
    [fleet] provider in jobfleet.toml? (A plain `run` decides without loading the fleet's
    settings unless the file names a provider.)"""
    from jobfleet.config import config_path

    if flags.given():
        return True
    path = config_path()
    if not (os.environ.get("JOBFLEET_PROVIDER")
            or (path.is_file() and "provider" in path.read_text())):
        return False
    return fleet_settings(flags).sources["provider"] != "default"


def fleet_settings(flags: FleetFlags) -> FleetSettings:
    from jobfleet.fleet.settings import load_fleet_settings

    return load_fleet_settings(
        {"provider": flags.provider, "name": flags.fleet, "max_workers": flags.max_workers,
         "keep_alive": flags.keep_alive or None},
        provider_flags={"hosts": flags.hosts, "ssh_key": flags.ssh_key})


def open_provider(fs: FleetSettings) -> Provider:
    """The chosen provider, its settings checked (before anything is stored or started)."""
    from jobfleet.fleet import provider_named

    return provider_named(fs.provider, fs.name, fs.provider_settings())


def launch_spec(fs: FleetSettings, s: Settings, db: Store, blobs: Blobs,
                run_id: str | None, idle_exit: float | None = None) -> LaunchSpec:
    """What each worker the fleet starts is: the store and blobs travel in its environment."""
    from jobfleet import __version__
    from jobfleet.fleet import LaunchSpec

    lease = s.lease_seconds if s.sources.get("lease_seconds") != "default" else None
    env = {"JOBFLEET_STORE": db.location, "JOBFLEET_BLOBS": blobs.location}
    # what libpq reads besides the URL (a password kept out of it, TLS files) goes along, in
    # the environment; cloud credentials do not: workers get their own (a role, the host's)
    env.update({k: v for k, v in os.environ.items() if k in _PASSED_ON})
    token = None
    if fs.server and fs.worker_token_file:  # gateway mode: workers get only a worker token
        try:
            token = Path(fs.worker_token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"[fleet] worker_token_file = {fs.worker_token_file}: {e.strerror}",
                              hint="create it with `jobfleet token create --role worker"
                                   " --out FILE`") from None
    return LaunchSpec(
        fleet=fs.name, run_id=run_id, slots=fs.slots or s.slots,
        idle_exit=fs.idle_exit if idle_exit is None else idle_exit, lease_seconds=lease,
        env=env, version=__version__, server=fs.server, token=token, ca_file=fs.ca_file)


def warn_if_unreachable(fs: FleetSettings, db: Store, blobs: Blobs) -> None:
    """A store or blob folder on this machine cannot be reached by workers on others."""
    if fs.provider == "local":
        return
    if not db.url.startswith("postgres"):
        err.print(f"[yellow]warning:[/] the store {db.url} is a file on this machine; workers"
                  f" started by {fs.provider} see it only through a shared filesystem. Use a"
                  " postgresql:// store (see docs/providers).")
    if "://" not in blobs.location:
        err.print(f"[yellow]warning:[/] the blob store {blobs.location} is a folder on this"
                  f" machine; workers started by {fs.provider} need it on a shared filesystem,"
                  " or an s3:// blob store.")


def budget_for(fs: FleetSettings) -> Budget:
    """The run's caps with the price of a worker-hour; refused now if they cannot hold."""
    from jobfleet.fleet.cost import Budget, worker_price

    price = worker_price(fs.provider, fs.provider_settings(), fs.price, fs.prices)
    budget = Budget(price, fs.max_hourly_cost, fs.max_total_cost, fs.absolute_timeout)
    budget.check()
    return budget


def cost_text(usage: list[Usage]) -> str:
    """`$1.23 (m5.large: 12.5 worker-hours)`: what fleets spent on a run."""
    from jobfleet.fleet.cost import money

    parts = ", ".join(f"{u.instance_type}: {u.worker_seconds / 3600:.2f} worker-hours"
                      for u in usage)
    return f"{money(sum(u.cost for u in usage))} ({parts})"


def keep_alive_note(fs: FleetSettings) -> str:
    return (f"keep-alive is on: workers stay until `jobfleet fleet down --fleet {fs.name}`"
            if fs.keep_alive else "")


def machine_json(m: Machine) -> dict[str, object]:
    return {"id": m.id, "provider": m.provider, "fleet": m.fleet, "phase": m.phase,
            "worker": m.worker_id, "host": m.host, "run": m.run_id, "reason": m.reason,
            "log_tail": list(m.log_tail)}


@fleet_app.command("status")
def fleet_status(
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Each worker of the fleet with its phase; a failed one with why and its log's tail."""
    fs = fleet_settings(FleetFlags(provider, fleet, hosts=hosts, ssh_key=ssh_key))
    p = open_provider(fs)
    machines = p.list()
    if json:
        out.print(dumps({"fleet": fs.name, "provider": p.describe(), "keep_alive": fs.keep_alive,
                         "machines": [machine_json(m) for m in machines]}))
        return
    from jobfleet.store import open_store

    workers = {w.id: w for w in open_store(settings(store).store).workers()}
    note = keep_alive_note(fs)
    live = sum(m.phase in ("launching", "bootstrapping", "ready") for m in machines)
    out.print(f"fleet [bold]{fs.name}[/] ({fs.provider}): {live} live, {len(machines)} in all"
              + (f"  [yellow]{note}[/]" if note else ""))
    if not machines:
        out.print("  nothing of this fleet is running")
        return
    from rich.table import Table

    table = Table(box=None)
    for col in ("machine", "host", "phase", "worker", "heartbeat", "jobs done"):
        table.add_column(col)
    for m in machines:
        w = workers.get(m.worker_id or "")
        phase = m.phase if not m.reason or m.phase == "ready" else f"{m.phase}: {m.reason}"
        table.add_row(m.id, m.host or "", escape(phase), m.worker_id or "",
                      ago(w.heartbeat_at) if w else "", str(w.jobs_done) if w else "")
    out.print(table)
    for m in machines:
        if m.phase == "failed" and m.log_tail:
            out.print(f"\n[red]{escape(m.id)}[/] log (last {len(m.log_tail)} lines):")
            for line in m.log_tail:
                out.print(f"  [dim]|[/] {escape(line)}")


@fleet_app.command("up")
def fleet_up(
    workers: Annotated[int, typer.Argument(help="How many workers to start.")] = 1,
    run: Annotated[str | None, typer.Option("--run", help="Serve only this run.")] = None,
    idle_exit: Annotated[float, typer.Option(
        "--idle-exit", metavar="SECONDS", help="Workers exit after this long idle.")] = 600.0,
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Start workers by hand; they take jobs from any run (or --run) and exit when idle."""
    fs = fleet_settings(FleetFlags(provider, fleet, hosts=hosts, ssh_key=ssh_key))
    p = open_provider(fs)
    s = settings(store, blobs)
    db, blob_store = connect(s)
    warn_if_unreachable(fs, db, blob_store)
    run_id = db.run(run).id if run else None
    machines = p.launch(workers, launch_spec(fs, s, db, blob_store, run_id, idle_exit))
    for m in machines:
        out.print(f"{m.id}: {m.phase}" + (f" ({escape(m.reason)})" if m.reason else ""))
    out.print(f"watch them with: jobfleet fleet status --fleet {fs.name}"
              + (f" --provider {fs.provider}" if provider else ""))


@fleet_app.command("down")
def fleet_down(
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
) -> None:
    """Stop every worker of the fleet, then look again and say what is still there."""
    from jobfleet.fleet.autoscale import down

    fs = fleet_settings(FleetFlags(provider, fleet, hosts=hosts, ssh_key=ssh_key))
    p = open_provider(fs)
    before = p.list()
    left = down(p)
    report_teardown(fs, before, left)
    if left:
        raise typer.Exit(1)


def report_teardown(fs: FleetSettings, before: list[Machine], left: list[Machine]) -> None:
    live = [m for m in before if m.phase in ("launching", "bootstrapping", "ready")]
    if not left:
        out.print(f"fleet {fs.name}: {len(live)} workers stopped; listed again, nothing is left")
        return
    err.print(f"[red]fleet {fs.name}: {len(left)} still there after teardown:[/]")
    for m in left:
        err.print(f"  {m.id} on {m.host or '?'}: {m.phase}"
                  + (f" ({escape(m.reason)})" if m.reason else ""))
    err.print(f"  try again with `jobfleet fleet down --fleet {fs.name}`, or stop them by hand")


@fleet_app.command("autoscale")
def fleet_autoscale(
    run: Annotated[str | None, typer.Option(
        "--run", help="Size the fleet to this run, and stop once it is done.")] = None,
    provider: ProviderOpt = None,
    fleet: FleetOpt = None,
    hosts: HostsOpt = None,
    ssh_key: SshKeyOpt = None,
    max_workers: MaxWorkersOpt = None,
    keep_alive: KeepAliveOpt = None,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Keep the fleet sized to the queue (for runs made with `submit`), until Ctrl-C."""
    from jobfleet.fleet.autoscale import Autoscaler, Step, down

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet: %(message)s")
    fs = fleet_settings(FleetFlags(provider, fleet, max_workers, keep_alive, hosts, ssh_key))
    p = open_provider(fs)
    s = settings(store, blobs)
    db, blob_store = connect(s)
    warn_if_unreachable(fs, db, blob_store)
    budget = budget_for(fs)
    the_run = db.run(run) if run else None
    run_id = the_run.id if the_run else None
    if the_run is not None and the_run.stopped:  # resuming a run a cap stopped
        out.print(f"run {run_id} was stopped ({the_run.stopped}); going on with it")
        db.stop_run(the_run.id, None)
    scaler = Autoscaler(db, p, launch_spec(fs, s, db, blob_store, run_id), fs.max_workers,
                        keep_alive=fs.keep_alive, budget=budget)
    note = keep_alive_note(fs)

    def show(step: Step) -> None:
        cost = f", {step.spent:.2f} $ so far" if budget.price.per_hour else ""
        out.print(f"{time.strftime('%H:%M:%S')} fleet {fs.name}: {len(step.live)} live,"
                  f" {step.wanted} wanted{cost}" + (f"  {note}" if note else ""))

    try:
        last = scaler.run(lambda: run_id is not None and db.pending(run_id) == 0, on_step=show)
        if last.stopped:
            err.print(f"[red]run {run_id} stopped: {last.stopped}[/]")
    except KeyboardInterrupt:
        out.print("stopping the autoscaler")
    if not fs.keep_alive:
        before = p.list()
        report_teardown(fs, before, down(p))
