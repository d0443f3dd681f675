"""The EC2 half of the aws provider: one instance per worker, started with user data that
installs jobfleet and runs the worker, and shuts the instance down (terminating it) when the
worker exits, so an idle machine stops billing.

Spot instances are asked for through RunInstances' market options; with
`market = "spot-with-fallback"`, a spot launch that finds no capacity in any of the subnets is
made on-demand instead.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import shlex
import threading
from collections.abc import Sequence
from typing import Any

from jobfleet.errors import ConfigError
from jobfleet.fleet.aws import FLEET_TAG, RUN_TAG, WORKER_TAG, Context, error_code, explain_error, tags
from jobfleet.fleet.aws_quota import Quota, ec2_quota, family
from jobfleet.fleet.base import FAILED, LAUNCHING, LIVE, READY, STOPPED, LaunchSpec, Machine

log = logging.getLogger("jobfleet.fleet")

#: errors that mean "no spot capacity (or price) here now": another subnet, or on-demand
SPOT_UNAVAILABLE = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded", "UnfulfillableCapacity", "InsufficientHostCapacity",
    "capacity-not-available", "capacity-oversubscribed", "price-too-low"})
#: state reasons of terminated instances that mean it never worked
_FAILED_REASONS = frozenset({
    "Server.InsufficientInstanceCapacity", "Server.InternalError", "Client.VolumeLimitExceeded",
    "Client.InternalError", "Client.InvalidSnapshot.NotFound", "Server.ScheduledStop"})
_SPOT_RECLAIMED = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
#: where the boot script installs jobfleet on the instance
VENV = "/opt/jobfleet"
BOOT_LOG = "/var/log/jobfleet-worker.log"


def instance_phase(state: str, reason_code: str = "", reason_message: str = "",
                   instance_id: str = "") -> tuple[str, str | None]:
    """(phase, reason) of an instance from its state and state reason."""
    if state == "pending":
        return LAUNCHING, None
    if state == "running":
        return READY, None
    if state in ("shutting-down", "stopping"):
        return READY, "shutting down"
    if state == "stopped":
        return STOPPED, ("stopped, not terminated: its volume still costs;"
                         " `jobfleet fleet down` terminates it")
    if reason_code in _SPOT_RECLAIMED:
        return STOPPED, "spot instance reclaimed by AWS"
    if reason_code == "Client.InstanceInitiatedShutdown":
        return STOPPED, ("it shut itself down: its worker exited (idle, or interrupted), or"
                         " its setup failed (`aws ec2 get-console-output --latest"
                         f" --instance-id {instance_id}` shows the boot log's last words)")
    if reason_code == "Client.UserInitiatedShutdown":
        return STOPPED, "terminated (fleet down, or by hand)"
    if reason_code in _FAILED_REASONS:
        return FAILED, reason_message or reason_code
    return STOPPED, reason_message or reason_code or None


def user_data(ctx: Context, spec: LaunchSpec, worker_id: str, path: str, spot: bool) -> str:
    """The boot script: set up, install jobfleet, run the worker (its environment read from
    the SSM parameters under `path`), then shut down. Holds no secret."""
    cfg = ctx.cfg
    py = shlex.quote(cfg.python)
    requirement = cfg.install or (f"jobfleet[aws,postgres,s3]=={spec.version}" if spec.version
                                  else "jobfleet[aws,postgres,s3]")
    args = spec.worker_args(worker_id) + (["--spot-watch"] if spot else [])
    worker = shlex.join([f"{VENV}/bin/python", "-m", "jobfleet.fleet.aws_boot", "--region",
                         cfg.region, "--parameters", path, "--", *args])
    log_file = shlex.quote(BOOT_LOG)
    return f"""#!/bin/bash
# jobfleet worker {worker_id} of fleet {ctx.fleet} (run {spec.run_id or 'any'}), started by
# jobfleet's aws provider. No credentials here: the worker reads its environment (store,
# blob store) from the SecureString parameters under {path} with this instance's profile.
exec >>{log_file} 2>&1
PY={py}
REQ={shlex.quote(requirement)}
say() {{ echo "jobfleet-boot: $*"; echo "jobfleet-boot: $*" >/dev/console 2>/dev/null || true; }}
finish() {{ say "$1; shutting down"; shutdown -h now; exit "$2"; }}
say "setting up worker {worker_id}"
{cfg.setup}
FIX="set image, or python and setup, in [providers.aws]"
command -v "$PY" >/dev/null || finish "FAILED: $PY not found ($FIX)" 1
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  finish "FAILED: $("$PY" --version 2>&1) is older than 3.11 ($FIX)" 1
[ -x {VENV}/bin/python ] || "$PY" -m venv {VENV} ||
  finish "FAILED: $PY -m venv did not work (install the venv module in setup)" 1
{VENV}/bin/pip install --quiet --disable-pip-version-check "$REQ" ||
  finish "FAILED: pip install $REQ did not work" 1
say "starting the worker"
if command -v systemd-run >/dev/null; then
  # its own unit: at shutdown only the worker gets SIGTERM (it drains), not its jobs
  systemd-run --wait --collect --quiet --unit jobfleet-worker -p KillMode=mixed \\
    -p TimeoutStopSec=90 -p StandardOutput=append:{BOOT_LOG} -p StandardError=append:{BOOT_LOG} \\
    {worker}
else
  {worker}
fi
finish "the worker exited with status $?" 0
"""


class Ec2:
    """Workers as EC2 instances, one per worker."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        self._vcpus: float | None = None
        self._vcpus_of: dict[str, float] = {}  # instance type -> its default vCPUs
        self._root_device: str | None = None
        self._subnet_turn = itertools.count()
        self._lock = threading.Lock()

    @property
    def ec2(self) -> Any:
        return self.ctx.client("ec2")

    # -- checks -----------------------------------------------------------------------------
    def check(self) -> None:
        cfg = self.cfg
        assert cfg.instance_type is not None and cfg.instance_profile is not None
        try:
            found = self.ec2.describe_instance_types(InstanceTypes=[cfg.instance_type])
            info = found["InstanceTypes"][0]
        except Exception as e:
            if error_code(e) not in ("InvalidInstanceType", "InvalidParameterValue"):
                raise ConfigError(explain_error(e, "describing instance types"),
                                  hint="docs/providers/aws.md: the control side's policy") from None
            raise ConfigError(
                f"providers.aws: instance_type = {cfg.instance_type!r} is not an instance type"
                f" offered in {cfg.region}",
                hint=self._close_types(cfg.instance_type)) from None
        self._vcpus = float(info["VCpuInfo"]["DefaultVCpus"])
        if cfg.market != "on-demand" and "spot" not in info.get("SupportedUsageClasses",
                                                                 ["spot"]):
            raise ConfigError(f"providers.aws: {cfg.instance_type} is not offered as spot",
                              hint="set market = \"on-demand\", or choose another type")
        self._check_profile(cfg.instance_profile)
        if cfg.volume_size:
            try:
                images = self.ec2.describe_images(ImageIds=[cfg.image])["Images"]
            except Exception as e:
                raise ConfigError(explain_error(e, f"looking up image {cfg.image}"),
                                  hint="AMI ids are per region: look it up in this one") from None
            if not images:
                raise ConfigError(f"providers.aws: image {cfg.image} is not in {cfg.region}",
                                  hint="AMI ids are per region: look it up in this one")
            self._root_device = images[0].get("RootDeviceName") or "/dev/xvda"

    def _close_types(self, wanted: str) -> str:
        """The offered types nearest to `wanted`: its generation's (`c5*`), else its
        family's (`c*`)."""
        names: list[str] = []
        for pattern in (wanted.split(".")[0] + "*", family(wanted) + "*"):
            pages = self.ec2.get_paginator("describe_instance_types").paginate(
                Filters=[{"Name": "instance-type", "Values": [pattern]}])
            names = [t["InstanceType"] for page in pages for t in page["InstanceTypes"]]
            if names:
                break
        close = difflib.get_close_matches(wanted, names, n=8, cutoff=0.6)
        choices = close or sorted(names)[:12]
        return ((f"valid choices near it: {', '.join(choices)}; " if choices else "")
                + f"`aws ec2 describe-instance-types --region {self.cfg.region}` lists them all")

    def _check_profile(self, profile: str) -> None:
        name = profile.rsplit("/", 1)[-1]
        try:
            found = self.ctx.client("iam").get_instance_profile(InstanceProfileName=name)
        except Exception as e:
            if error_code(e) == "NoSuchEntity":
                raise ConfigError(
                    f"providers.aws: instance_profile {profile!r} does not exist",
                    hint="create it with a role workers may use (docs/providers/aws.md: the"
                         " worker policy), or fix instance_profile") from None
            raise ConfigError(explain_error(e, f"looking up instance profile {name}"),
                              hint="the control side needs iam:GetInstanceProfile on it"
                                   " (docs/providers/aws.md)") from None
        if not found["InstanceProfile"].get("Roles"):
            raise ConfigError(f"providers.aws: instance profile {name} has no role, so its"
                              " workers would have no credentials",
                              hint=f"aws iam add-role-to-instance-profile --instance-profile-name"
                                   f" {name} --role-name ROLE")

    def vcpus_per_worker(self) -> float:
        return self._vcpus or 1.0

    def quota(self, spot: bool | None = None) -> Quota:
        cfg = self.cfg
        assert cfg.instance_type is not None
        spot = cfg.market != "on-demand" if spot is None else spot
        code = ec2_quota(cfg.instance_type, spot)
        if code is None:
            return Quota(None, None, note=f"jobfleet reads the standard families' quotas only,"
                                          f" not {cfg.instance_type}'s")
        value, note = self.ctx.quota_value(code[0], code[1])
        if value is None:
            return Quota(code, None, note=note)
        return Quota(code, value, self._in_use(spot))

    def _in_use(self, spot: bool) -> float:
        """vCPUs of this region's pending and running instances the same quota counts (each
        at its type's default vCPUs, as the quota counts them)."""
        counts: dict[str, int] = {}
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
        for page in pages:
            for res in page["Reservations"]:
                for inst in res["Instances"]:
                    kind = inst["InstanceType"]
                    if ec2_quota(kind, spot) and (inst.get("InstanceLifecycle") == "spot") == spot:
                        counts[kind] = counts.get(kind, 0) + 1
        return sum(n * self._type_vcpus(kind) for kind, n in counts.items())

    def _type_vcpus(self, kind: str) -> float:
        if kind not in self._vcpus_of:
            info = self.ec2.describe_instance_types(InstanceTypes=[kind])["InstanceTypes"][0]
            self._vcpus_of[kind] = float(info["VCpuInfo"]["DefaultVCpus"])
        return self._vcpus_of[kind]

    # -- launch -----------------------------------------------------------------------------
    def launch_one(self, worker_id: str, spec: LaunchSpec, path: str) -> Machine:
        cfg = self.cfg
        subnets: list[str | None] = list(cfg.subnets) or [None]
        with self._lock:
            turn = next(self._subnet_turn)
        subnets = subnets[turn % len(subnets):] + subnets[:turn % len(subnets)]
        error: Exception | None = None
        if cfg.market != "on-demand":
            for subnet in subnets:
                try:
                    return self._run(worker_id, spec, path, subnet, spot=True)
                except Exception as e:  # noqa: BLE001 - an AWS error, reported below
                    error = e
                    if error_code(e) not in SPOT_UNAVAILABLE:
                        return self._failed(worker_id, spec, e, "spot")
            if cfg.market == "spot":
                assert error is not None
                return self._failed(worker_id, spec, error, "spot")
            assert error is not None
            log.warning("aws: no spot capacity for %s (%s); launching %s on-demand",
                        cfg.instance_type, error_code(error), worker_id)
        try:
            return self._run(worker_id, spec, path, subnets[0], spot=False)
        except Exception as e:  # noqa: BLE001
            return self._failed(worker_id, spec, e, "on-demand")

    def _failed(self, worker_id: str, spec: LaunchSpec, e: Exception, market: str) -> Machine:
        reason = explain_error(e, f"launching a {market} {self.cfg.instance_type}")
        log.warning("aws: %s", reason)
        return Machine(worker_id, "aws", self.ctx.fleet, FAILED, worker_id, None, spec.run_id,
                       reason=reason)

    def _run(self, worker_id: str, spec: LaunchSpec, path: str, subnet: str | None,
             spot: bool) -> Machine:
        cfg = self.cfg
        assert cfg.instance_type is not None and cfg.instance_profile is not None
        labels = tags(self.ctx.fleet, spec.run_id, worker_id) | {
            "Name": f"jobfleet-{worker_id}", "jobfleet:market": "spot" if spot else "on-demand"}
        tag_list = [{"Key": k, "Value": v} for k, v in labels.items()]
        kinds = ["instance", "volume", "network-interface"] + (
            ["spot-instances-request"] if spot else [])
        profile = cfg.instance_profile
        args: dict[str, Any] = {
            "ImageId": cfg.image, "InstanceType": cfg.instance_type, "MinCount": 1,
            "MaxCount": 1, "UserData": user_data(self.ctx, spec, worker_id, path, spot),
            "IamInstanceProfile": {"Arn": profile} if profile.startswith("arn:")
            else {"Name": profile},
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": k, "Tags": tag_list} for k in kinds],
            "ClientToken": f"{worker_id}-{'spot' if spot else 'od'}-{subnet or 'default'}"[:64],
        }
        if spot:
            args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        if subnet:
            args["SubnetId"] = subnet
        if cfg.security_groups:
            args["SecurityGroupIds"] = list(cfg.security_groups)
        if cfg.key_name:
            args["KeyName"] = cfg.key_name
        if cfg.volume_size and self._root_device:
            args["BlockDeviceMappings"] = [{"DeviceName": self._root_device, "Ebs": {
                "VolumeSize": cfg.volume_size, "DeleteOnTermination": True}}]
        inst = self.ec2.run_instances(**args)["Instances"][0]
        return Machine(inst["InstanceId"], "aws", self.ctx.fleet, LAUNCHING, worker_id,
                       inst.get("PrivateIpAddress"), spec.run_id)

    # -- list, terminate --------------------------------------------------------------------
    def list(self) -> list[Machine]:
        fleet = [{"Name": f"tag:{FLEET_TAG}", "Values": [self.ctx.fleet]}]
        found = []
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=fleet):
            for res in page["Reservations"]:
                for inst in res["Instances"]:
                    found.append(self._machine(inst))
        requests = self.ec2.describe_spot_instance_requests(Filters=fleet)
        for req in requests.get("SpotInstanceRequests", []):
            if req.get("InstanceId"):  # listed with its instance
                continue
            found.append(self._request(req))
        return found

    def _machine(self, inst: dict[str, Any]) -> Machine:
        labels = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        reason = inst.get("StateReason", {})
        phase, why = instance_phase(inst["State"]["Name"], reason.get("Code", ""),
                                    reason.get("Message", ""), inst["InstanceId"])
        run = labels.get(RUN_TAG)
        return Machine(inst["InstanceId"], "aws", self.ctx.fleet, phase,
                       labels.get(WORKER_TAG),
                       inst.get("PrivateDnsName") or inst.get("PrivateIpAddress") or None,
                       None if run in (None, "any") else run, why)

    def _request(self, req: dict[str, Any]) -> Machine:
        """A spot request that has no instance: waiting (open) or failed."""
        labels = {t["Key"]: t["Value"] for t in req.get("Tags", [])}
        status = req.get("Status", {})
        why = f"spot request {status.get('Code', req['State'])}: {status.get('Message', '')}"
        phase = LAUNCHING if req["State"] == "open" else FAILED
        run = labels.get(RUN_TAG)
        return Machine(req["SpotInstanceRequestId"], "aws", self.ctx.fleet, phase,
                       labels.get(WORKER_TAG), None,
                       None if run in (None, "any") else run, why.rstrip(": "))

    def terminate(self, ids: Sequence[str], machines: dict[str, Machine]) -> None:
        requests = [i for i in ids if i.startswith("sir-")]
        instances = [i for i in ids if i.startswith("i-") and (
            machines[i].phase in LIVE or "not terminated" in (machines[i].reason or ""))]
        if requests:
            self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=requests)
        for i in range(0, len(instances), 500):
            self.ec2.terminate_instances(InstanceIds=instances[i:i + 500])

    def cleanup(self) -> None:
        """Nothing outlives an instance here (volumes go with it)."""
