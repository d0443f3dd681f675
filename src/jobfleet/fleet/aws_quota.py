"""vCPU quotas: which Service Quotas code limits a launch, and what to do when a launch would
go past it (launch what fits now and the rest in waves, or stop with the number to ask for).

`plan` is the decision, on numbers alone; `Quota` says where the numbers came from, or why
there are none (Service Quotas not readable here, a family jobfleet does not know the code of).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from jobfleet.errors import JobfleetError

#: Service Quotas codes (service, code, what AWS calls it)
EC2_ON_DEMAND = ("ec2", "L-1216C47A",
                 "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances")
EC2_SPOT = ("ec2", "L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests")
FARGATE = ("fargate", "L-3032A538", "Fargate On-Demand vCPU resource count")
#: instance families the two EC2 codes above count
STANDARD_FAMILIES = frozenset({"a", "c", "d", "h", "i", "m", "r", "t", "z", "im", "is"})
_FAMILY = re.compile(r"([a-z]+)")


class QuotaError(JobfleetError):
    """The launch would go past a vCPU quota."""


def family(instance_type: str) -> str:
    """`c` for c6i.large, `im` for im4gn.xlarge, `inf` for inf2.xlarge."""
    m = _FAMILY.match(instance_type)
    return m.group(1) if m else ""


def ec2_quota(instance_type: str, spot: bool) -> tuple[str, str, str] | None:
    """The quota that counts instances of this type, or None for families not covered."""
    if family(instance_type) not in STANDARD_FAMILIES:
        return None
    return EC2_SPOT if spot else EC2_ON_DEMAND


@dataclass(frozen=True, slots=True)
class Quota:
    """A vCPU quota and how much of it is in use; `value` None when it could not be read."""

    code: tuple[str, str, str] | None
    value: float | None
    used: float = 0.0
    note: str = ""  # why there is no value, or what `used` leaves out


@dataclass(frozen=True, slots=True)
class Plan:
    """How many of the workers asked for to launch now, and what to tell the user."""

    launch: int
    message: str | None = None  # set when fewer than asked for are launched, or unchecked


def quota_name(q: Quota) -> str:
    if q.code is None:
        return "the vCPU quota"
    service, code, title = q.code
    return f"the {service} quota {code} ({title})"


def plan(n: int, per_worker: float, quota: Quota, on_quota: str) -> Plan:
    """Launch `n` workers of `per_worker` vCPUs each, given `quota`: all of them when they
    fit; with on_quota = waves what fits (the autoscaler launches more as others end); with
    on_quota = stop, QuotaError with the number to ask for."""
    if n <= 0:
        return Plan(0)
    if quota.value is None:
        return Plan(n, f"{quota_name(quota)} not checked: {quota.note}" if quota.note else None)
    need = quota.used + n * per_worker
    if need <= quota.value:
        return Plan(n)
    fits = max(0, math.floor((quota.value - quota.used) / per_worker)) if per_worker else n
    ask = math.ceil(need)
    where = (f"{n} workers of {per_worker:g} vCPUs need {n * per_worker:g} vCPUs, with"
             f" {quota.used:g} in use that is {ask}; {quota_name(quota)} is {quota.value:g}")
    request = (f"ask for at least {ask} vCPUs: Service Quotas console, or `aws service-quotas"
               f" request-service-quota-increase --service-code {quota.code[0]} --quota-code"
               f" {quota.code[1]} --desired-value {ask}`" if quota.code else
               f"ask AWS for at least {ask} vCPUs")
    if on_quota == "stop":
        raise QuotaError(f"{where}; on_quota = stop, so nothing more is launched",
                         hint=f"{request}; or set on_quota = \"waves\" in [providers.aws] to"
                              " run what fits now and the rest as workers end")
    return Plan(fits, f"{where}: launching {fits} now, more as workers end (on_quota ="
                      f" waves); to run all at once, {request}")
