"""The autoscaler: as many workers as the queue needs, up to `max_workers`, and none once the
work is done.

Each step compares what the jobs ask for (`Store.demand`) with what each worker offers,
launches the difference, and drains surplus workers that have nothing to do. It holds no
state a restart would lose: machines come from the provider's `list`, work from the store.
Workers also exit on their own when idle (`LaunchSpec.idle_exit`), so a controller that dies
leaves nothing running for long.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jobfleet.errors import JobfleetError
from jobfleet.fleet.base import FAILED, LAUNCHING, LIVE, READY, LaunchSpec, Machine, Provider
from jobfleet.fleet.cost import Budget, Price
from jobfleet.store import Demand, Store

log = logging.getLogger("jobfleet.fleet")

#: seconds between steps
INTERVAL = 2.0
#: a surplus worker is drained only once it has been idle this long, seconds
IDLE_GRACE = 5.0
#: launches that end in failure before the autoscaler stops trying (while nothing is live)
MAX_FAILED_LAUNCHES = 3
#: how often `run` asks whether the work is done, seconds
_DONE_POLL = 0.2
#: how long `down` waits for machines to go, seconds
DOWN_WAIT = 60.0


class FleetError(JobfleetError):
    """The fleet could not start a worker."""


def workers_needed(demand: Demand, spec: LaunchSpec, max_workers: int) -> int:
    """Workers the queued and running jobs need: by slots, and by CPUs, memory and GPUs
    where each worker's are known; at most `max_workers`."""
    if demand.jobs == 0:
        return 0
    need = math.ceil(demand.jobs / spec.slots)
    if spec.cpus:
        need = max(need, math.ceil(demand.cpus / spec.cpus))
    if spec.memory:
        need = max(need, math.ceil(demand.memory / spec.memory))
    if spec.gpus:
        need = max(need, math.ceil(demand.gpus / spec.gpus))
    return min(max_workers, need)


@dataclass(slots=True)
class Step:
    """What one look at the fleet found and did."""

    wanted: int
    machines: list[Machine]
    launched: int = 0
    drained: list[str] = field(default_factory=list)
    spent: float = 0.0  # what the fleet has cost the run so far, US dollars
    stopped: str | None = None  # a cap stopped the run: budget, timeout

    @property
    def live(self) -> list[Machine]:
        return [m for m in self.machines if m.phase in LIVE]

    @property
    def failed(self) -> list[Machine]:
        return [m for m in self.machines if m.phase == FAILED]


class Autoscaler:
    """Sizes one fleet to the jobs of one run (or of every run, when `spec.run_id` is None)."""

    def __init__(self, store: Store, provider: Provider, spec: LaunchSpec, max_workers: int,
                 *, keep_alive: bool = False, idle_grace: float = IDLE_GRACE,
                 budget: Budget | None = None, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.provider, self.spec = store, provider, spec
        self.max_workers, self.keep_alive, self.clock = max_workers, keep_alive, clock
        self.idle_grace, self.interval = idle_grace, interval
        self.budget = budget or Budget(Price(provider.name, None, "no caps"))
        allowed = self.budget.workers_allowed()
        if allowed is not None and allowed < max_workers:
            log.info("max_hourly_cost allows %d workers at %s", allowed, self.budget.price.text())
            self.max_workers = allowed
        self._idle_since: dict[str, float] = {}  # worker id -> when we first saw it idle
        self._failed_launches = 0
        # what the fleet cost the run so far: earlier sessions' usage, then ours
        run_id = spec.run_id
        self.spent = sum(u.cost for u in store.usage(run_id)) if run_id else 0.0
        self._counted_at: float | None = None
        self._billing = 0  # machines live at the last step (each one bills)

    def step(self) -> Step:
        spent = self._account()
        demand = self.store.demand(self.spec.run_id)
        step = Step(workers_needed(demand, self.spec, self.max_workers), self.provider.list(),
                    spent=spent)
        room = self.provider.capacity()
        if room is not None:
            step.wanted = min(step.wanted, room)
        live = step.live
        if room == 0 and demand.jobs and not live:
            raise FleetError(f"{self.provider.name} has no room left for any worker: "
                             + ("; ".join(f"{m.host or m.id}: {m.reason}" for m in step.failed)
                                or "none of its places is usable"),
                             hint="jobfleet fleet status shows each one's log")
        self._billing = len(live)
        step.stopped = self._over_a_cap(len(live), step.wanted)
        if step.stopped:
            log.warning("run %s stopped: %s", self.spec.run_id, step.stopped)
            assert self.spec.run_id is not None
            self.store.stop_run(self.spec.run_id, step.stopped)
            if live:
                self.provider.terminate([m.id for m in live])
            step.wanted = 0
            return step
        if len(live) < step.wanted:
            self._launch(step, step.wanted - len(live))
        elif len(live) > step.wanted and not self.keep_alive:
            step.drained = self._surplus(live, demand, len(live) - step.wanted)
            if step.drained:
                log.info("draining %d idle workers: %s", len(step.drained),
                         ", ".join(step.drained))
                self.provider.terminate(step.drained)
        return step

    def _account(self) -> float:
        """Add the worker time since the last step (machines live then) to the run's usage."""
        now = self.clock()
        run_id = self.spec.run_id
        if self._counted_at is not None and run_id and self._billing:
            seconds = (now - self._counted_at) * self._billing
            cost = self.budget.cost(seconds)
            self.store.add_usage(run_id, self.budget.price.label, seconds, cost)
            self.spent += cost
        self._counted_at = now
        return self.spent

    def _over_a_cap(self, live: int, wanted: int) -> str | None:
        """The cap the run is about to go over (budget, timeout), if any."""
        b, run_id = self.budget, self.spec.run_id
        if run_id is None:
            return None
        if b.max_total_cost is not None:
            # the next interval at the size it is going to be must fit in what is left
            coming = b.cost(max(live, min(wanted, self.max_workers)) * self.interval)
            if self.spent + coming > b.max_total_cost:
                return "budget"
        if (b.absolute_timeout is not None
                and time.time() - self.store.run(run_id).created_at >= b.absolute_timeout):
            return "timeout"
        return None

    def _launch(self, step: Step, n: int) -> None:
        new = self.provider.launch(n, self.spec)
        step.launched = sum(m.phase in LIVE for m in new)
        step.machines += new
        if step.launched:
            self._failed_launches = 0
            log.info("launched %d workers (%d wanted)", step.launched, step.wanted)
            return
        self._failed_launches += 1
        if self._failed_launches >= MAX_FAILED_LAUNCHES and not step.live:
            reasons = "; ".join(f"{m.host or m.id}: {m.reason}" for m in step.failed) or "none"
            raise FleetError(f"{self.provider.name} could not start any worker"
                             f" ({self._failed_launches} tries): {reasons}",
                             hint="jobfleet fleet status shows each one's log; "
                                  "jobfleet doctor checks the provider's settings")

    def _surplus(self, live: list[Machine], demand: Demand, n: int) -> list[str]:
        """Up to `n` machines to let go: still launching first, then ready ones whose worker
        has been idle for `idle_grace` seconds."""
        now = self.clock()
        busy = {w for w, jobs in demand.busy.items() if jobs}
        for wid in busy:
            self._idle_since.pop(wid, None)
        chosen = [m.id for m in live if m.phase == LAUNCHING][:n]
        for m in live:
            if len(chosen) >= n:
                break
            if m.phase != READY or not m.worker_id or m.worker_id in busy:
                continue
            since = self._idle_since.setdefault(m.worker_id, now)
            if now - since >= self.idle_grace:
                chosen.append(m.id)
        return chosen

    def run(self, done: Callable[[], bool],
            on_step: Callable[[Step], None] | None = None) -> Step:
        """Step every `interval` seconds until `done()` (looked at more often) or a cap stops
        the run. Returns the last step; taking the fleet down is the caller's (see `down`)."""
        while True:
            step = self.step()
            if on_step is not None:
                on_step(step)
            if step.stopped:
                return step
            next_step = self.clock() + self.interval
            while True:
                if done():
                    return step
                if self.clock() >= next_step:
                    break
                time.sleep(min(_DONE_POLL, max(0.0, next_step - self.clock())))


def down(provider: Provider, wait: float = DOWN_WAIT) -> list[Machine]:
    """Terminate every machine of `provider`'s fleet; what is left afterwards."""
    machines = provider.list()
    if machines:
        provider.terminate([m.id for m in machines])
    until = time.monotonic() + wait
    while True:
        left = [m for m in provider.list() if m.phase in LIVE]
        if not left or time.monotonic() >= until:
            return left
        time.sleep(0.5)
