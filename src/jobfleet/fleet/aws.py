"""The `aws` provider: workers on EC2 instances (spot, on-demand, or spot falling back to
on-demand) bootstrapped by their user data, or as ECS tasks on Fargate running a worker image.

Credentials: workers get theirs from an instance profile or a task role, never from access
keys. The worker's environment (the store's URL, which may hold a password, and the blob
store) is written to SSM Parameter Store as SecureString parameters under
`/jobfleet/FLEET/DIGEST/` (tagged like everything else), read at start by the instance profile
(`aws_boot`) or handed to the container by ECS (`secrets`); user data and task definitions
name the parameters, never their values. They are deleted when the fleet's last machine is
terminated.

Every resource (instance, volume, spot request, task, task definition, parameter) carries the
tags `jobfleet:fleet`, `jobfleet:run` and (machines) `jobfleet:worker`; `list` finds machines
by those tags, so `fleet down` can prove nothing is left. Settings are checked before the
first call that creates anything (`check`); vCPU quotas are read from Service Quotas where
they can be and checked before each launch (`on_quota`).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from jobfleet.errors import ConfigError
from jobfleet.fleet.autoscale import FleetError
from jobfleet.fleet.aws_boot import PREFIX, parameter_path
from jobfleet.fleet.aws_quota import Quota, QuotaError, plan, quota_name
from jobfleet.fleet.aws_settings import AwsSettings, parse_settings
from jobfleet.fleet.base import FAILED, LIVE, LaunchSpec, Machine, OnChange, Provider

if TYPE_CHECKING:
    from jobfleet.fleet.aws_ec2 import Ec2
    from jobfleet.fleet.aws_ecs import Ecs

log = logging.getLogger("jobfleet.fleet")

#: tag keys
FLEET_TAG, RUN_TAG, WORKER_TAG = "jobfleet:fleet", "jobfleet:run", "jobfleet:worker"
#: launches made at once
_LAUNCH_THREADS = 8
#: error codes that mean "the caller may not": the control side's policy lacks an action
_DENIED = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException",
           "UnrecognizedClientException", "InvalidClientTokenId", "AuthFailure")


class AwsQuotaError(QuotaError, FleetError):
    """The launch would go past a vCPU quota (on_quota = stop)."""


def boto3_module() -> Any:
    """boto3, or a ConfigError that says which extra to install."""
    try:
        import boto3
    except ImportError:
        raise ConfigError("the aws provider needs boto3, which is not installed",
                          hint="pip install 'jobfleet[aws]'") from None
    return boto3


def aws_errors() -> tuple[type[Exception], ...]:
    """The exceptions an AWS call raises (botocore's), for `except aws_errors():`."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def error_code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__))


def explain_error(e: BaseException, action: str) -> str:
    """One line for an AWS error: the code, AWS's message, and what to do about it."""
    code = error_code(e)
    message = getattr(e, "response", {}).get("Error", {}).get("Message") or str(e)
    text = f"{action}: {code}: {message}"
    if code in _DENIED:
        text += (" (this machine's AWS identity may not do that: docs/providers/aws.md has the"
                 " control side's IAM policy)")
    elif type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        text += " (no AWS credentials here: set AWS_PROFILE, or run where a role provides them)"
    return text


def tags(fleet: str, run_id: str | None, worker_id: str | None = None) -> dict[str, str]:
    found = {FLEET_TAG: fleet, RUN_TAG: run_id or "any"}
    if worker_id:
        found[WORKER_TAG] = worker_id
    return found


def worker_env(spec: LaunchSpec) -> dict[str, str]:
    """The variables workers get through SSM: the store's and blobs' (or, in gateway mode,
    the server's and the worker token), those with a value."""
    return {k: v for k, v in spec.worker_env().items() if v}


class Context:
    """What the EC2 and ECS halves share: the settings, the fleet, AWS clients (made once,
    lazily: boto3 is imported only when AWS is called)."""

    def __init__(self, fleet: str, cfg: AwsSettings) -> None:
        self.fleet, self.cfg = fleet, cfg
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._quotas: dict[str, float | None] = {}
        self._quota_notes: dict[str, str] = {}

    def client(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                boto3 = boto3_module()
                from botocore.config import Config

                self._clients[service] = boto3.client(
                    service, region_name=self.cfg.region,
                    config=Config(retries={"mode": "standard", "max_attempts": 6}))
            return self._clients[service]

    def quota_value(self, service: str, code: str) -> tuple[float | None, str]:
        """A quota's applied value from Service Quotas (read once), or None and why not."""
        if code not in self._quotas:
            try:
                answer = self.client("service-quotas").get_service_quota(
                    ServiceCode=service, QuotaCode=code)
                self._quotas[code] = float(answer["Quota"]["Value"])
            except Exception as e:  # noqa: BLE001 - no quota is a note, not a failure
                self._quotas[code] = None
                self._quota_notes[code] = explain_error(
                    e, f"Service Quotas has no answer for {service} {code} in"
                       f" {self.cfg.region}")
        return self._quotas[code], self._quota_notes.get(code, "")


class AwsProvider(Provider):
    """Workers on EC2 instances or ECS (Fargate) tasks, tagged with their fleet."""

    name = "aws"

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        super().__init__(fleet, settings, on_change)
        self.cfg = parse_settings(settings)
        self.ctx = Context(self.fleet, self.cfg)
        if self.cfg.mode == "ec2":
            from jobfleet.fleet.aws_ec2 import Ec2

            self.backend: Ec2 | Ecs = Ec2(self.ctx)
        else:
            from jobfleet.fleet.aws_ecs import Ecs

            self.backend = Ecs(self.ctx)
        self._checked = False
        self.last_plan_message: str | None = None  # the latest quota note, for status

    # -- before anything is created ---------------------------------------------------------
    def check(self) -> None:
        """What only AWS can tell (the instance type exists, the profile or roles do): a
        ConfigError listing the valid choices. Runs once, before the first launch."""
        if not self._checked:
            self.backend.check()
            self._checked = True

    def quota(self, spot: bool | None = None) -> Quota:
        """The vCPU quota this fleet's launches count against, and what is in use of it (no
        value, with why, when either cannot be read)."""
        try:
            return self.backend.quota(spot)
        except aws_errors() as e:
            return Quota(None, None, note=explain_error(e, "counting the vCPUs in use"))

    def quota_report(self) -> tuple[str, str, str | None]:
        """For `jobfleet doctor`: (PASS, WARN, FAIL or SKIP, what was found, what to do)."""
        try:
            self.check()
            q = self.quota()
        except ConfigError as e:
            return "FAIL", e.message, e.hint
        if q.value is None:
            return "SKIP", f"{quota_name(q)} not readable: {q.note}", (
                "allow servicequotas:GetServiceQuota to the control side to have it checked"
                " before each launch" if q.code else None)
        per = self.backend.vcpus_per_worker()
        fits = max(0, int((q.value - q.used) // per)) if per else 0
        found = (f"{quota_name(q)} is {q.value:g} vCPUs, {q.used:g} in use: room for {fits} more"
                 f" workers of {per:g} vCPUs")
        if fits == 0:
            return "WARN", found, (f"ask for more (Service Quotas, {q.code[1] if q.code else ''}),"
                                   " or wait for running instances to end")
        return "PASS", found, None

    # -- the provider interface -------------------------------------------------------------
    def launch(self, n: int, spec: LaunchSpec) -> list[Machine]:
        self.check()
        try:
            decided = plan(n, self.backend.vcpus_per_worker(), self.quota(), self.cfg.on_quota)
        except QuotaError as e:
            raise AwsQuotaError(e.message, hint=e.hint) from None
        if decided.message and decided.message != self.last_plan_message:
            log.warning("aws: %s", decided.message)
        self.last_plan_message = decided.message
        if decided.launch == 0:
            return [Machine(f"quota-{secrets.token_hex(2)}", self.name, self.fleet, FAILED,
                            run_id=spec.run_id, reason=decided.message)] if n else []
        try:
            path = self._store_env(spec)
        except aws_errors() as e:
            reason = explain_error(e, "writing the workers' environment to SSM Parameter Store")
            log.warning("aws: %s", reason)
            return [Machine(f"{self.fleet}-{secrets.token_hex(3)}", self.name, self.fleet,
                            FAILED, run_id=spec.run_id, reason=reason) for _ in range(n)]
        ids = [f"{self.fleet}-{secrets.token_hex(3)}" for _ in range(decided.launch)]
        with ThreadPoolExecutor(min(_LAUNCH_THREADS, len(ids))) as pool:
            machines = list(pool.map(lambda wid: self.backend.launch_one(wid, spec, path), ids))
        for m in machines:
            self.on_change(m)
        return machines

    def list(self) -> list[Machine]:
        try:
            return self.backend.list()
        except aws_errors() as e:
            raise FleetError(explain_error(e, f"listing fleet {self.fleet}'s machines"),
                             hint="docs/providers/aws.md: the control side's policy") from None

    def terminate(self, ids: Sequence[str]) -> None:
        """Stop these machines (only those tagged with this fleet), then list again; once
        nothing of the fleet is live, delete its parameters and task definitions."""
        mine = {m.id: m for m in self.list()}
        ours = [i for i in ids if i in mine]
        try:
            if ours:
                self.backend.terminate(ours, mine)
            if not any(m.phase in LIVE for m in self.list()):
                self.remove_leftovers()
        except aws_errors() as e:
            raise FleetError(explain_error(e, f"stopping fleet {self.fleet}'s machines"),
                             hint="docs/providers/aws.md: the control side's policy; `jobfleet"
                                  f" fleet down --fleet {self.fleet}` tries again") from None

    def describe(self) -> dict[str, object]:
        c = self.cfg
        found: dict[str, object] = {"provider": self.name, "fleet": self.fleet,
                                    "region": c.region, "mode": c.mode, "image": c.image}
        if c.mode == "ec2":
            found |= {"instance_type": c.instance_type, "market": c.market,
                      "instance_profile": c.instance_profile, "subnets": list(c.subnets)}
        else:
            found |= {"cluster": c.cluster, "cpu": c.cpu, "memory_mib": c.memory,
                      "task_role": c.task_role, "subnets": list(c.subnets)}
        found |= {"on_quota": c.on_quota,
                  "worker_environment": f"SSM SecureString parameters under {PREFIX}/{self.fleet}/"}
        return found

    # -- the worker's environment -----------------------------------------------------------
    def _store_env(self, spec: LaunchSpec) -> str:
        """Write the workers' environment as SecureString parameters (once per distinct
        environment); the path they are under."""
        env = worker_env(spec)
        path = parameter_path(self.fleet, env)
        ssm = self.ctx.client("ssm")
        names = [f"{path}/{var}" for var in sorted(env)]
        have = set()
        for i in range(0, len(names), 10):
            found = ssm.get_parameters(Names=names[i:i + 10], WithDecryption=False)
            have |= {p["Name"] for p in found["Parameters"]}
        for var, value in sorted(env.items()):
            name = f"{path}/{var}"
            if name in have:
                continue
            extra = {"KeyId": self.cfg.kms_key} if self.cfg.kms_key else {}
            ssm.put_parameter(
                Name=name, Value=value, Type="SecureString", Tier="Standard",
                Description=f"jobfleet fleet {self.fleet}: the workers' {var}",
                Tags=[{"Key": k, "Value": v} for k, v in tags(self.fleet, spec.run_id).items()],
                **extra)
        return path

    def parameters(self) -> Sequence[str]:
        """The names of this fleet's parameters (its workers' environments)."""
        ssm = self.ctx.client("ssm")
        pages = ssm.get_paginator("get_parameters_by_path").paginate(
            Path=f"{PREFIX}/{self.fleet}", Recursive=True, WithDecryption=False)
        return [p["Name"] for page in pages for p in page["Parameters"]]

    def remove_leftovers(self) -> None:
        """Delete the fleet's parameters and task definitions (nothing of it is live)."""
        names = self.parameters()
        ssm = self.ctx.client("ssm")
        for i in range(0, len(names), 10):
            ssm.delete_parameters(Names=names[i:i + 10])
        self.backend.cleanup()
