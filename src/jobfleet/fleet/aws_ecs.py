"""The ECS half of the aws provider: workers as Fargate tasks of one task definition per fleet
(family `jobfleet-FLEET`), each task started with its own worker id.

The worker image must have `jobfleet` (the same version) on its PATH; the container runs
`jobfleet worker ARGS`. Its environment (store, blob store) comes from the fleet's
SecureString parameters through the container's `secrets`, which ECS resolves with the
execution role: the task definition holds the parameters' ARNs, not their values.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from jobfleet.errors import ConfigError
from jobfleet.fleet.aws import (
    FLEET_TAG,
    RUN_TAG,
    WORKER_TAG,
    Context,
    error_code,
    explain_error,
    tags,
    worker_env,
)
from jobfleet.fleet.aws_quota import FARGATE, Quota
from jobfleet.fleet.base import FAILED, LAUNCHING, LIVE, READY, STOPPED, LaunchSpec, Machine

log = logging.getLogger("jobfleet.fleet")

CONTAINER = "worker"
_STARTING = frozenset({"PROVISIONING", "PENDING", "ACTIVATING"})
_STOPPING = frozenset({"DEACTIVATING", "STOPPING", "DEPROVISIONING"})
#: seconds ECS waits between SIGTERM (the worker drains) and SIGKILL; Fargate's maximum
STOP_TIMEOUT = 120


def task_phase(task: dict[str, Any]) -> tuple[str, str | None]:
    """(phase, reason) of an ECS task as describe_tasks shows it."""
    last = task.get("lastStatus", "")
    stopping = task.get("desiredStatus") == "STOPPED"
    if last in _STARTING:
        return LAUNCHING, "stopping" if stopping else None
    if last == "RUNNING":
        return READY, "stopping" if stopping else None
    if last in _STOPPING:
        return READY, "stopping"
    code = task.get("stopCode") or ""
    why = task.get("stoppedReason") or ""
    container: dict[str, Any] = next(
        (c for c in task.get("containers", []) if c.get("name") == CONTAINER), {})
    exit_code = container.get("exitCode")
    detail = container.get("reason")
    if code == "TaskFailedToStart":
        return FAILED, "; ".join(x for x in (why, detail) if x) or "the task failed to start"
    if code == "SpotInterruption":
        return STOPPED, "Fargate Spot reclaimed it"
    if code == "EssentialContainerExited" and exit_code not in (None, 0):
        return FAILED, f"its worker exited with status {exit_code}" + (
            f": {detail}" if detail else "")
    if code == "EssentialContainerExited":
        return STOPPED, "its worker exited (idle, or interrupted)"
    return STOPPED, why or code or None


class Ecs:
    """Workers as Fargate tasks in one cluster."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        self.family = f"jobfleet-{ctx.fleet}"
        self._roles: dict[str, str] = {}  # role setting -> its ARN
        self._definitions: dict[str, str] = {}  # parameters path -> task definition ARN
        self._account: str | None = None
        self._lock = threading.Lock()

    @property
    def ecs(self) -> Any:
        return self.ctx.client("ecs")

    # -- checks -----------------------------------------------------------------------------
    def check(self) -> None:
        cfg = self.cfg
        assert cfg.task_role is not None and cfg.execution_role is not None
        for setting, role in (("task_role", cfg.task_role),
                              ("execution_role", cfg.execution_role)):
            self._roles[setting] = self._role_arn(setting, role)
        try:
            found = self.ecs.describe_clusters(clusters=[cfg.cluster])
        except Exception as e:
            raise ConfigError(explain_error(e, f"looking up ECS cluster {cfg.cluster}"),
                              hint="docs/providers/aws.md: the control side's policy") from None
        active = [c for c in found.get("clusters", []) if c.get("status") == "ACTIVE"]
        if not active:
            raise ConfigError(f"providers.aws: ECS cluster {cfg.cluster!r} does not exist (or is"
                              f" not active) in {cfg.region}",
                              hint=f"aws ecs create-cluster --cluster-name {cfg.cluster}"
                                   f" --region {cfg.region}, or fix cluster")

    def _role_arn(self, setting: str, role: str) -> str:
        name = role.rsplit("/", 1)[-1]
        try:
            return str(self.ctx.client("iam").get_role(RoleName=name)["Role"]["Arn"])
        except Exception as e:
            if error_code(e) == "NoSuchEntity":
                raise ConfigError(f"providers.aws: {setting} {role!r} does not exist",
                                  hint=f"create the role (docs/providers/aws.md shows its"
                                       f" policy), or fix {setting}") from None
            raise ConfigError(explain_error(e, f"looking up role {name}"),
                              hint="the control side needs iam:GetRole on it"
                                   " (docs/providers/aws.md)") from None

    def vcpus_per_worker(self) -> float:
        assert self.cfg.cpu is not None
        return self.cfg.cpu / 1024

    def quota(self, spot: bool | None = None) -> Quota:
        value, note = self.ctx.quota_value(FARGATE[0], FARGATE[1])
        if value is None:
            return Quota(FARGATE, None, note=note)
        return Quota(FARGATE, value, self._in_use(),
                     note=f"tasks of other clusters than {self.cfg.cluster} are not counted")

    def _in_use(self) -> float:
        """vCPUs of the Fargate tasks running in this fleet's cluster."""
        arns = [a for page in self.ecs.get_paginator("list_tasks").paginate(
            cluster=self.cfg.cluster, desiredStatus="RUNNING") for a in page["taskArns"]]
        used = 0.0
        for task in self._describe(arns):
            if task.get("launchType") == "FARGATE" and task.get("lastStatus") != "STOPPED":
                used += int(task.get("cpu") or 0) / 1024
        return used

    # -- launch -----------------------------------------------------------------------------
    def _definition(self, spec: LaunchSpec, path: str) -> str:
        """The task definition for workers whose environment is under `path` (registered once
        per provider and path)."""
        with self._lock:
            if path in self._definitions:
                return self._definitions[path]
            cfg = self.cfg
            if self._account is None:
                self._account = self.ctx.client("sts").get_caller_identity()["Account"]
            arn = f"arn:aws:ssm:{cfg.region}:{self._account}:parameter"
            container: dict[str, Any] = {
                "name": CONTAINER, "image": cfg.image, "essential": True,
                "cpu": cfg.cpu, "memory": cfg.memory,
                "entryPoint": ["jobfleet"], "command": ["worker"],
                "secrets": [{"name": var, "valueFrom": f"{arn}{path}/{var}"}
                            for var in sorted(worker_env(spec))],
                "stopTimeout": STOP_TIMEOUT,
            }
            if cfg.log_group:
                container["logConfiguration"] = {"logDriver": "awslogs", "options": {
                    "awslogs-group": cfg.log_group, "awslogs-region": cfg.region,
                    "awslogs-stream-prefix": self.family}}
            registered = self.ecs.register_task_definition(
                family=self.family, requiresCompatibilities=["FARGATE"], networkMode="awsvpc",
                cpu=str(cfg.cpu), memory=str(cfg.memory),
                taskRoleArn=self._roles["task_role"],
                executionRoleArn=self._roles["execution_role"],
                containerDefinitions=[container],
                tags=[{"key": k, "value": v} for k, v in tags(self.ctx.fleet,
                                                               spec.run_id).items()])
            self._definitions[path] = registered["taskDefinition"]["taskDefinitionArn"]
            return self._definitions[path]

    def launch_one(self, worker_id: str, spec: LaunchSpec, path: str) -> Machine:
        cfg = self.cfg
        try:
            definition = self._definition(spec, path)
            answer = self.ecs.run_task(
                cluster=cfg.cluster, taskDefinition=definition, launchType="FARGATE",
                count=1, startedBy=f"jobfleet/{self.ctx.fleet}",
                networkConfiguration={"awsvpcConfiguration": {
                    "subnets": list(cfg.subnets), "securityGroups": list(cfg.security_groups),
                    "assignPublicIp": "ENABLED" if cfg.assign_public_ip else "DISABLED"}},
                overrides={"containerOverrides": [{
                    "name": CONTAINER, "command": ["worker", *spec.worker_args(worker_id)]}]},
                tags=[{"key": k, "value": v}
                      for k, v in tags(self.ctx.fleet, spec.run_id, worker_id).items()],
                enableECSManagedTags=True)
        except Exception as e:  # noqa: BLE001 - an AWS error becomes the machine's reason
            reason = explain_error(e, "starting a Fargate task")
            log.warning("aws: %s", reason)
            return Machine(worker_id, "aws", self.ctx.fleet, FAILED, worker_id, None,
                           spec.run_id, reason=reason)
        if not answer.get("tasks"):
            failures = "; ".join(f"{f.get('arn', '')} {f.get('reason', '')}: {f.get('detail', '')}"
                                 for f in answer.get("failures", []))
            return Machine(worker_id, "aws", self.ctx.fleet, FAILED, worker_id, None,
                           spec.run_id, reason=f"ECS did not start the task: {failures}")
        return Machine(answer["tasks"][0]["taskArn"], "aws", self.ctx.fleet, LAUNCHING,
                       worker_id, None, spec.run_id)

    # -- list, terminate --------------------------------------------------------------------
    def _describe(self, arns: list[str]) -> list[dict[str, Any]]:
        found = []
        for i in range(0, len(arns), 100):
            found += self.ecs.describe_tasks(cluster=self.cfg.cluster, tasks=arns[i:i + 100],
                                             include=["TAGS"])["tasks"]
        return found

    def list(self) -> list[Machine]:
        arns: dict[str, None] = {}
        for status in ("RUNNING", "STOPPED"):
            for page in self.ecs.get_paginator("list_tasks").paginate(
                    cluster=self.cfg.cluster, startedBy=f"jobfleet/{self.ctx.fleet}",
                    desiredStatus=status):
                arns.update(dict.fromkeys(page["taskArns"]))
        found = []
        for task in self._describe(list(arns)):
            labels = {t["key"]: t["value"] for t in task.get("tags", [])}
            if labels.get(FLEET_TAG) != self.ctx.fleet:
                continue
            phase, why = task_phase(task)
            run = labels.get(RUN_TAG)
            found.append(Machine(task["taskArn"], "aws", self.ctx.fleet, phase,
                                 labels.get(WORKER_TAG), None,
                                 None if run in (None, "any") else run, why))
        return found

    def terminate(self, ids: Sequence[str], machines: dict[str, Machine]) -> None:
        for arn in ids:
            if machines[arn].phase in LIVE and machines[arn].reason != "stopping":
                self.ecs.stop_task(cluster=self.cfg.cluster, task=arn,
                                   reason=f"jobfleet: fleet {self.ctx.fleet} stopped it")

    def cleanup(self) -> None:
        """Deregister (and delete, where ECS allows) the fleet's task definitions."""
        arns = [a for page in self.ecs.get_paginator("list_task_definitions").paginate(
            familyPrefix=self.family, status="ACTIVE") for a in page["taskDefinitionArns"]]
        ours = [a for a in arns if a.rsplit("/", 1)[-1].rsplit(":", 1)[0] == self.family]
        for arn in ours:
            self.ecs.deregister_task_definition(taskDefinition=arn)
        for i in range(0, len(ours), 10):
            try:
                self.ecs.delete_task_definitions(taskDefinitions=ours[i:i + 10])
            except Exception as e:  # noqa: BLE001 - inactive definitions cost nothing
                log.info("aws: task definitions left inactive: %s", explain_error(e, "delete"))
        self._definitions.clear()
