"""What a fleet costs: a dated price table shipped with jobfleet, the price of one worker-hour
for the chosen provider, estimates from sampled jobs, and the caps a run must stay under.

Caps are enforced, not advisory: one that cannot hold is refused before anything starts, and
the autoscaler stops a run (scales to zero, jobs left queued) the moment it would go over.
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jobfleet.errors import ConfigError, JobfleetError


@functools.cache
def price_table() -> dict[str, Any]:
    return tomllib.loads(resources.files("jobfleet.fleet").joinpath("prices.toml").read_text())


@dataclass(frozen=True, slots=True)
class Price:
    """What one worker costs an hour."""

    label: str  # what it runs on: an instance type, a Fargate size, the provider's name
    per_hour: float | None  # US dollars; None: not known
    source: str  # where the figure comes from

    def text(self) -> str:
        if self.per_hour is None:
            return f"{self.label}: price unknown ({self.source})"
        return f"{self.label}: ${self.per_hour:.4g} per worker-hour ({self.source})"


#: providers whose workers cost nothing beyond the machines they already run on
_FREE = ("local",)


def worker_price(provider: str, settings: dict[str, object], price: float | None = None,
                 overrides: dict[str, float] | None = None) -> Price:
    """The price of a worker-hour: `price` ([fleet] price) when given; else from the
    instance type or Fargate size in the provider's settings, through `overrides` ([prices]
    in jobfleet.toml) and the table; free for the local provider; unknown otherwise."""
    table = price_table()
    dated = f"price table {table['date']}, {table['region']}"
    itype = str(settings.get("instance_type") or "")
    if price is not None:
        return Price(itype or provider, price, "[fleet] price")
    if itype:
        known = (overrides or {}).get(itype)
        source = "[prices] in jobfleet.toml" if known is not None else dated
        if known is None:
            known = table["ec2"].get(itype)
        if known is None:
            return Price(itype, None, "not in the price table: set [prices] or [fleet] price")
        if str(settings.get("market", "on-demand")).startswith("spot"):
            return Price(f"{itype} spot", known * table["spot"]["fraction"],
                         f"{source}, typical spot at {table['spot']['fraction']:.0%} of on-demand")
        return Price(itype, known, source)
    if settings.get("mode") == "ecs" and settings.get("cpu") and settings.get("memory"):
        vcpu = float(str(settings["cpu"])) / 1024
        gb = float(str(settings["memory"])) / 1024
        fargate = table["fargate"]
        return Price(f"fargate {vcpu:g} vCPU {gb:g} GB",
                     vcpu * fargate["vcpu_hour"] + gb * fargate["gb_hour"], dated)
    if provider in _FREE:
        return Price(provider, 0.0, "workers on this machine")
    return Price(provider, None, "set [fleet] price to the cost of one worker-hour")


class BudgetError(JobfleetError):
    """A cap of the run cannot hold."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Budget:
    """The caps a run's fleet must stay under; None: no cap."""

    price: Price
    max_hourly_cost: float | None = None
    max_total_cost: float | None = None
    absolute_timeout: float | None = None  # seconds from the run's creation

    @property
    def capped(self) -> bool:
        return self.max_hourly_cost is not None or self.max_total_cost is not None

    def check(self) -> None:
        """Refuse, before anything starts, caps that cannot hold."""
        p = self.price
        if self.capped and p.per_hour is None:
            raise BudgetError(f"a cost cap is set but the price of a worker-hour is unknown"
                              f" ({p.text()})", hint="set [fleet] price = DOLLARS_PER_HOUR in"
                              " jobfleet.toml, or the instance type's price under [prices]")
        if self.max_hourly_cost is not None and p.per_hour and p.per_hour > self.max_hourly_cost:
            raise BudgetError(f"one worker costs ${p.per_hour:.4g}/h ({p.label}), more than"
                              f" max_hourly_cost ${self.max_hourly_cost:g}/h",
                              hint="raise max_hourly_cost, or choose a cheaper instance type")
        if self.max_total_cost is not None and self.max_total_cost <= 0:
            raise BudgetError("max_total_cost is 0: no worker could start",
                              hint="set max_total_cost above 0, or remove it")

    def workers_allowed(self) -> int | None:
        """The most workers that may run at once under max_hourly_cost (None: no limit)."""
        if self.max_hourly_cost is None or not self.price.per_hour:
            return None
        return math.floor(self.max_hourly_cost / self.price.per_hour + 1e-9)

    def cost(self, worker_seconds: float) -> float:
        return worker_seconds / 3600 * (self.price.per_hour or 0.0)


def money(dollars: float) -> str:
    return f"${dollars:,.2f}" if dollars >= 0.1 or dollars == 0 else f"${dollars:.4f}"


@dataclass(frozen=True, slots=True)
class Estimate:
    """Expected wall time and cost of `jobs` jobs of `seconds` each on a fleet."""

    jobs: int
    seconds: float  # per job, on average
    workers: int
    slots: int
    price: Price

    @property
    def wall(self) -> float:
        """Seconds until the last job ends, the jobs spread evenly over every slot."""
        return math.ceil(self.jobs / (self.workers * self.slots)) * self.seconds

    @property
    def worker_hours(self) -> float:
        return self.wall * self.workers / 3600

    @property
    def cost(self) -> float | None:
        return None if self.price.per_hour is None else self.worker_hours * self.price.per_hour


def check_ceiling(max_workers: int, ceiling: int) -> None:
    if max_workers > ceiling:
        raise ConfigError(f"max_workers = {max_workers} is above the ceiling of {ceiling}"
                          " workers", hint="lower max_workers, or raise [fleet] workers_ceiling"
                          " in jobfleet.toml if you mean it")
