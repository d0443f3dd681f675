"""The aws provider against moto's server on 127.0.0.1: moto is an emulator of the AWS APIs,
used because no real AWS account can be reached from here. It speaks the same HTTP API, so
boto3 and the provider run their real code; what moto does not model (Service Quotas for EC2
and Fargate, instances that really boot) is said in the test that meets it.

Every test makes its own fleet name: the emulator lives for the whole session.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jobfleet.errors import ConfigError
from jobfleet.fleet import LIVE, LaunchSpec, provider_named
from jobfleet.fleet.autoscale import down
from jobfleet.fleet.aws_ec2 import instance_phase, user_data
from jobfleet.fleet.aws_ecs import task_phase
from jobfleet.fleet.aws_settings import check_fargate, fargate_memories, parse_settings

REGION = "us-east-1"
PASSWORD = "s3cret-Pa55word"
STORE = f"postgresql://jobs:{PASSWORD}@db.internal:5432/jobfleet"
#: the control side's own (dummy) keys: they must never reach a machine
ACCESS_KEY, SECRET_KEY = "AKIAJOBFLEETTESTKEY1", "control-side-secret-key-do-not-copy"


@dataclass
class Aws:
    """The emulator, with a role, an instance profile, a cluster, a subnet and a group."""

    endpoint: str
    image: str
    subnet: str
    group: str
    profile: str
    task_role: str
    execution_role: str
    cluster: str
    clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self.clients:
            import boto3

            self.clients[service] = boto3.client(service, region_name=REGION)
        return self.clients[service]

    def ec2_settings(self, **extra: object) -> dict[str, object]:
        return {"mode": "ec2", "region": REGION, "instance_type": "c5.large",
                "image": self.image, "subnet": self.subnet, "security_groups": [self.group],
                "instance_profile": self.profile, **extra}

    def ecs_settings(self, **extra: object) -> dict[str, object]:
        return {"mode": "ecs", "region": REGION, "cluster": self.cluster, "cpu": 512,
                "memory": "1GiB", "image": "example/jobfleet-worker:0.1.0",
                "task_role": self.task_role, "execution_role": self.execution_role,
                "subnets": [self.subnet], "security_groups": [self.group], **extra}

    def instances(self, fleet: str) -> list[dict[str, Any]]:
        pages = self.client("ec2").describe_instances(
            Filters=[{"Name": "tag:jobfleet:fleet", "Values": [fleet]}])["Reservations"]
        return [i for r in pages for i in r["Instances"]]

    def parameters(self, fleet: str) -> list[dict[str, Any]]:
        return self.client("ssm").get_parameters_by_path(
            Path=f"/jobfleet/{fleet}", Recursive=True, WithDecryption=True)["Parameters"]


@pytest.fixture(scope="module")
def aws(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aws]:
    """The emulator's AWS variables (dummy keys that must never reach a machine), set for
    this module, and the resources every test shares (made once)."""
    tmp = tmp_path_factory.mktemp("aws")
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials")}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        import boto3

        tag = secrets.token_hex(3)
        iam = boto3.client("iam", region_name=REGION)
        trust = json.dumps({"Version": "2012-10-17", "Statement": []})
        role = iam.create_role(RoleName=f"jf-worker-{tag}", AssumeRolePolicyDocument=trust)
        execution = iam.create_role(RoleName=f"jf-exec-{tag}", AssumeRolePolicyDocument=trust)
        iam.create_instance_profile(InstanceProfileName=f"jf-worker-{tag}")
        iam.add_role_to_instance_profile(InstanceProfileName=f"jf-worker-{tag}",
                                         RoleName=role["Role"]["RoleName"])
        ec2 = boto3.client("ec2", region_name=REGION)
        image = "ami-0123456789abcdef0"  # the emulator does not check AMI ids by default
        subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
        group = ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]
        cluster = f"jf-{tag}"
        boto3.client("ecs", region_name=REGION).create_cluster(clusterName=cluster)
        yield Aws(moto_endpoint, image, subnet, group, f"jf-worker-{tag}",
                  role["Role"]["RoleName"], execution["Role"]["RoleName"], cluster)


def spec(fleet: str, run: str = "run0001") -> LaunchSpec:
    return LaunchSpec(fleet=fleet, run_id=run, slots=2, idle_exit=120,
                      env={"JOBFLEET_STORE": STORE, "JOBFLEET_BLOBS": "s3://bucket/jobfleet"},
                      version="0.1.0")


def fleet_name() -> str:
    return f"t{secrets.token_hex(4)}"


def assert_no_credentials(text: str) -> None:
    for secret in (PASSWORD, STORE, ACCESS_KEY, SECRET_KEY, "AWS_SECRET_ACCESS_KEY",
                   "AWS_ACCESS_KEY_ID"):
        assert secret not in text, f"{secret!r} found in:\n{text}"


# -- settings, checked before anything is called -------------------------------------------


def test_fargate_pairs_follow_aws_table() -> None:
    assert fargate_memories(256) == [512, 1024, 2048]
    assert fargate_memories(512) == [1024, 2048, 3072, 4096]
    assert fargate_memories(1024)[0] == 2048 and fargate_memories(1024)[-1] == 8192
    assert fargate_memories(4096)[-1] == 30720
    assert fargate_memories(8192) == list(range(16384, 61441, 4096))
    assert fargate_memories(16384) == list(range(32768, 122881, 8192))
    check_fargate(16384, 40960)
    with pytest.raises(ConfigError) as e:
        check_fargate(256, 4096)
    assert "0.5 GiB, 1 GiB to 2 GiB in 1 GiB steps" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_fargate(8192, 18432)  # 18 GiB: not a 4 GiB step
    assert "16 GiB to 60 GiB in 4 GiB steps" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_fargate(3000, 4096)
    assert "256 (0.25 vCPU)" in str(e.value.hint)


@pytest.mark.parametrize(("change", "says"), [
    ({"mode": "lambda"}, "choose one of: ec2, ecs"),
    ({"market": "cheap"}, "choose one of: spot, on-demand, spot-with-fallback"),
    ({"on_quota": "wait"}, "choose one of: waves, stop"),
    ({"instance_profile": None}, "instance_profile is not set"),
    ({"instance_type": "big"}, "not an instance type name"),
    ({"image": "ubuntu"}, "not an AMI id"),
    ({"subnet": "net-1"}, "not subnet ids"),
    ({"cluster": "c"}, "belong to mode ecs"),
    ({"colour": "blue"}, "has no setting 'colour'"),
])
def test_bad_ec2_settings_are_refused_with_the_choices(change: dict[str, object],
                                                       says: str) -> None:
    settings: dict[str, object] = {"mode": "ec2", "region": REGION, "instance_type": "c5.large",
                                   "image": "ami-0123456789abcdef0",
                                   "instance_profile": "jf-worker"}
    settings.update(change)
    with pytest.raises(ConfigError) as e:
        parse_settings({k: v for k, v in settings.items() if v is not None})
    assert says in str(e.value)


@pytest.mark.parametrize(("change", "says"), [
    ({"memory": 4096, "cpu": "0.25 vCPU"}, "Fargate does not run cpu = 256 with memory = 4096"),
    ({"task_role": None}, "task_role is not set"),
    ({"execution_role": None}, "execution_role is not set"),
    ({"security_groups": None}, "security_groups is not set"),
    ({"instance_type": "c5.large"}, "belong to mode ec2"),
])
def test_bad_ecs_settings_are_refused_with_the_choices(change: dict[str, object],
                                                       says: str) -> None:
    settings: dict[str, object] = {
        "mode": "ecs", "region": REGION, "cluster": "c", "cpu": 1024, "memory": 2048,
        "image": "img", "task_role": "r", "execution_role": "x",
        "subnets": "subnet-0123456789abcdef0", "security_groups": "sg-0123456789abcdef0"}
    settings.update(change)
    with pytest.raises(ConfigError) as e:
        parse_settings({k: v for k, v in settings.items() if v is not None})
    assert says in str(e.value)


def test_phases_from_instance_and_task_states() -> None:
    assert instance_phase("pending")[0] == "launching"
    assert instance_phase("running") == ("ready", None)
    assert instance_phase("shutting-down")[0] == "ready"  # still billing: teardown waits
    assert instance_phase("terminated", "Server.SpotInstanceTermination") == (
        "stopped", "spot instance reclaimed by AWS")
    phase, why = instance_phase("terminated", "Client.InstanceInitiatedShutdown", "", "i-1")
    assert phase == "stopped" and "get-console-output" in str(why)
    assert instance_phase("terminated", "Server.InsufficientInstanceCapacity",
                          "Server.InsufficientInstanceCapacity: no capacity")[0] == "failed"
    assert task_phase({"lastStatus": "PROVISIONING"})[0] == "launching"
    assert task_phase({"lastStatus": "RUNNING", "desiredStatus": "RUNNING"}) == ("ready", None)
    assert task_phase({"lastStatus": "STOPPED", "stopCode": "TaskFailedToStart",
                       "stoppedReason": "CannotPullContainerError: pull access denied"}) == (
        "failed", "CannotPullContainerError: pull access denied")
    assert task_phase({"lastStatus": "STOPPED", "stopCode": "EssentialContainerExited",
                       "containers": [{"name": "worker", "exitCode": 2}]})[0] == "failed"
    assert task_phase({"lastStatus": "STOPPED", "stopCode": "EssentialContainerExited",
                       "containers": [{"name": "worker", "exitCode": 0}]})[0] == "stopped"


# -- against the emulator --------------------------------------------------------------------


def test_ec2_launch_tags_everything_and_teardown_leaves_nothing(aws: Aws) -> None:
    """EC2 spot workers in moto (an emulator, as no real AWS is reachable here): every
    instance, volume and parameter carries the fleet, run and worker tags; the user data holds
    no credential; teardown terminates them and removes the parameters."""
    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings())
    machines = p.launch(2, spec(fleet))
    assert [m.phase for m in machines] == ["launching"] * 2, [m.reason for m in machines]

    listed = {m.id: m for m in p.list()}
    assert set(listed) == {m.id for m in machines}
    assert {m.phase for m in listed.values()} <= LIVE
    ec2 = aws.client("ec2")
    for inst in aws.instances(fleet):
        labels = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert labels["jobfleet:fleet"] == fleet and labels["jobfleet:run"] == "run0001"
        assert labels["jobfleet:worker"] == listed[inst["InstanceId"]].worker_id
        assert inst["InstanceLifecycle"] == "spot"
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        raw = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"],
                                              Attribute="userData")["UserData"]["Value"]
        script = base64.b64decode(raw).decode()
        assert_no_credentials(script)
        assert "--spot-watch" in script and "shutdown -h now" in script
        assert f"--id {labels['jobfleet:worker']}" in script
    volumes = ec2.describe_volumes(Filters=[{"Name": "tag:jobfleet:fleet", "Values": [fleet]}])
    assert len(volumes["Volumes"]) == 2

    stored = aws.parameters(fleet)  # the environment, as SecureString parameters, tagged
    assert {p_["Value"] for p_ in stored} == {STORE, "s3://bucket/jobfleet"}
    ssm = aws.client("ssm")
    for param in stored:
        assert ssm.get_parameter(Name=param["Name"])["Parameter"]["Type"] == "SecureString"
        listed_tags = ssm.list_tags_for_resource(ResourceType="Parameter",
                                                 ResourceId=param["Name"])["TagList"]
        assert {"Key": "jobfleet:fleet", "Value": fleet} in listed_tags
    assert_no_credentials(json.dumps(p.describe()))

    assert down(p, wait=10) == []
    assert all(i["State"]["Name"] == "terminated" for i in aws.instances(fleet))
    assert not [m for m in p.list() if m.phase in LIVE]
    assert aws.parameters(fleet) == []


def test_ecs_launch_tags_everything_and_task_definition_holds_no_credentials(aws: Aws) -> None:
    """Fargate workers in moto (an emulator, as no real AWS is reachable here): tasks and the
    task definition are tagged, the definition names the parameters but holds no value, and
    teardown stops the tasks and deregisters the definition."""
    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ecs_settings())
    machines = p.launch(2, spec(fleet, "run0002"))
    assert [m.phase for m in machines] == ["launching"] * 2, [m.reason for m in machines]
    ecs = aws.client("ecs")
    tasks = ecs.describe_tasks(cluster=aws.cluster, tasks=[m.id for m in machines],
                               include=["TAGS"])["tasks"]
    workers = set()
    for task in tasks:
        labels = {t["key"]: t["value"] for t in task["tags"]}
        assert labels["jobfleet:fleet"] == fleet and labels["jobfleet:run"] == "run0002"
        workers.add(labels["jobfleet:worker"])
        command = task["overrides"]["containerOverrides"][0]["command"]
        assert command[:3] == ["worker", "--id", labels["jobfleet:worker"]]
    assert workers == {m.worker_id for m in machines}
    definition = ecs.describe_task_definition(taskDefinition=tasks[0]["taskDefinitionArn"],
                                              include=["TAGS"])
    assert {"key": "jobfleet:fleet", "value": fleet} in definition["tags"]
    text = json.dumps(definition["taskDefinition"], default=str)
    assert_no_credentials(text)
    container = definition["taskDefinition"]["containerDefinitions"][0]
    assert {s["name"] for s in container["secrets"]} == {"JOBFLEET_STORE", "JOBFLEET_BLOBS"}
    assert all(s["valueFrom"].startswith("arn:aws:ssm:") for s in container["secrets"])
    assert not container.get("environment")
    assert {m.phase for m in p.list()} <= LIVE

    assert down(p, wait=10) == []
    assert all(m.phase not in LIVE for m in p.list())
    assert ecs.list_task_definitions(familyPrefix=f"jobfleet-{fleet}",
                                     status="ACTIVE")["taskDefinitionArns"] == []
    assert aws.parameters(fleet) == []


def test_unknown_instance_type_is_refused_before_anything_is_created(aws: Aws) -> None:
    """moto (an emulator: no real AWS here) knows the real list of instance types."""
    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings(instance_type="c5.hugelarge"))
    with pytest.raises(ConfigError) as e:
        p.launch(1, spec(fleet))
    assert "'c5.hugelarge' is not an instance type offered in us-east-1" in str(e.value)
    assert "c5.large" in str(e.value.hint)  # the valid choices near it
    assert aws.instances(fleet) == [] and aws.parameters(fleet) == []


def test_missing_instance_profile_and_role_are_refused_before_launch(aws: Aws) -> None:
    """IAM in moto (an emulator, as no real AWS is reachable here)."""
    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings(instance_profile="no-such-profile"))
    with pytest.raises(ConfigError, match="instance_profile 'no-such-profile' does not exist"):
        p.launch(1, spec(fleet))
    assert aws.instances(fleet) == []
    p = provider_named("aws", fleet, aws.ecs_settings(execution_role="no-such-role"))
    with pytest.raises(ConfigError, match="execution_role 'no-such-role' does not exist"):
        p.launch(1, spec(fleet))
    assert p.list() == [] and aws.parameters(fleet) == []


def test_invalid_fargate_pair_is_refused_before_any_call(aws: Aws) -> None:
    """moto (an emulator: no real AWS here) shows nothing was registered or started."""
    fleet = fleet_name()
    with pytest.raises(ConfigError) as e:
        provider_named("aws", fleet, aws.ecs_settings(cpu=1024, memory=512))
    assert "with cpu = 1024, memory may be 2 GiB to 8 GiB in 1 GiB steps" in str(e.value)
    ecs = aws.client("ecs")
    assert ecs.list_task_definitions(familyPrefix=f"jobfleet-{fleet}")["taskDefinitionArns"] == []
    assert ecs.list_tasks(cluster=aws.cluster, startedBy=f"jobfleet/{fleet}")["taskArns"] == []


def test_spot_without_capacity_falls_back_to_on_demand(aws: Aws,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """moto (an emulator: no real AWS here) always has spot capacity, so the spot request is
    refused here the way EC2 refuses it, and the on-demand launch goes to moto."""
    from botocore.exceptions import ClientError

    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings(market="spot-with-fallback"))
    ec2 = p.ctx.client("ec2")  # type: ignore[attr-defined]
    real = ec2.run_instances
    asked: list[str] = []

    def run_instances(**kw: Any) -> Any:
        asked.append("spot" if "InstanceMarketOptions" in kw else "on-demand")
        if "InstanceMarketOptions" in kw:
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity",
                                         "Message": "no spot capacity"}}, "RunInstances")
        return real(**kw)

    monkeypatch.setattr(ec2, "run_instances", run_instances)
    [m] = p.launch(1, spec(fleet))
    assert asked == ["spot", "on-demand"] and m.phase == "launching"
    [inst] = aws.instances(fleet)
    assert "InstanceLifecycle" not in inst
    assert {"Key": "jobfleet:market", "Value": "on-demand"} in inst["Tags"]
    assert down(p, wait=10) == []

    p = provider_named("aws", fleet, aws.ec2_settings(market="spot"))
    monkeypatch.setattr(p.ctx.client("ec2"), "run_instances", run_instances)  # type: ignore[attr-defined]
    [m] = p.launch(1, spec(fleet))
    assert m.phase == "failed" and "InsufficientInstanceCapacity" in str(m.reason)


def test_quota_unreadable_in_the_emulator_is_said_not_hidden(aws: Aws) -> None:
    """moto (an emulator: no real AWS here) has Service Quotas for VPC only, so the EC2 and
    Fargate quotas cannot be read: the launch goes on and says the quota was not checked."""
    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings(on_quota="stop"))
    quota = p.quota()  # type: ignore[attr-defined]
    assert quota.value is None and "NoSuchResourceException" in quota.note
    [m] = p.launch(1, spec(fleet))
    assert m.phase == "launching"
    assert "L-34B43A08" in str(p.last_plan_message) and "not checked" in str(p.last_plan_message)  # type: ignore[attr-defined]
    assert down(p, wait=10) == []


def test_user_data_is_a_valid_shell_script(aws: Aws, tmp_path: Path) -> None:
    p = provider_named("aws", "syntax", aws.ec2_settings(setup="apt-get install -y python3-venv"))
    script = user_data(p.ctx, spec("syntax"), "syntax-abc123", "/jobfleet/syntax/0123", True)  # type: ignore[attr-defined]
    (tmp_path / "boot.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "boot.sh")], check=True)
    assert "jobfleet[aws,postgres,s3]==0.1.0" in script
    assert "KillMode=mixed" in script  # at shutdown the worker drains; its jobs are not hit


def test_boot_reads_the_environment_from_parameters(aws: Aws) -> None:
    """What an instance runs first, against SSM in moto (an emulator: no real AWS here)."""
    from jobfleet.fleet.aws_boot import load_env

    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings())
    path = p._store_env(spec(fleet))  # type: ignore[attr-defined]
    assert load_env(path, aws.client("ssm")) == dict(spec(fleet).env)
    p.remove_leftovers()  # type: ignore[attr-defined]
    assert aws.parameters(fleet) == []


def test_quota_plan_with_real_numbers() -> None:
    from jobfleet.fleet.aws_quota import EC2_SPOT, FARGATE, Plan, Quota, QuotaError, plan

    spot = Quota(EC2_SPOT, 64.0, used=48.0)
    assert plan(4, 4.0, spot, "stop") == Plan(4)  # 48 + 16 = 64: fits exactly
    waves = plan(6, 4.0, spot, "waves")  # 48 + 24 = 72 > 64: 4 now
    assert waves.launch == 4
    assert "with 48 in use that is 72; the ec2 quota L-34B43A08" in str(waves.message)
    assert "--desired-value 72" in str(waves.message)
    with pytest.raises(QuotaError) as e:
        plan(6, 4.0, spot, "stop")
    assert "6 workers of 4 vCPUs need 24 vCPUs" in e.value.message
    assert "--quota-code L-34B43A08 --desired-value 72" in str(e.value.hint)
    assert plan(2, 0.5, Quota(FARGATE, 10.0, used=10.0), "waves").launch == 0
    unread = plan(3, 2.0, Quota(EC2_SPOT, None, note="AccessDenied"), "stop")
    assert unread.launch == 3 and "not checked: AccessDenied" in str(unread.message)


def test_launch_past_the_quota_runs_in_waves_or_stops(aws: Aws,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """moto (an emulator: no real AWS here) has no EC2 quotas, so the quota's value is given
    here; what is in use is counted from the emulator's running instances."""
    from jobfleet.fleet.autoscale import FleetError

    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings(on_quota="waves"))
    used = p.backend._in_use(True)  # type: ignore[attr-defined]
    monkeypatch.setattr(p.ctx, "quota_value", lambda service, code: (used + 2.0, ""))  # type: ignore[attr-defined]
    first = p.launch(3, spec(fleet))  # c5.large: 2 vCPUs, room for one
    assert [m.phase for m in first] == ["launching"]
    assert "launching 1 now" in str(p.last_plan_message)  # type: ignore[attr-defined]
    [waiting] = p.launch(2, spec(fleet))  # nothing fits until a worker ends
    assert waiting.phase == "failed" and "launching 0 now" in str(waiting.reason)

    stop = provider_named("aws", fleet, aws.ec2_settings(on_quota="stop"))
    monkeypatch.setattr(stop.ctx, "quota_value", lambda service, code: (used + 2.0, ""))  # type: ignore[attr-defined]
    with pytest.raises(FleetError) as e:
        stop.launch(1, spec(fleet))
    assert f"--desired-value {int(used) + 4}" in str(e.value.hint)
    assert len([m for m in p.list() if m.phase in LIVE]) == 1
    assert down(p, wait=10) == []


def test_doctor_reports_the_quota(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `jobfleet doctor` shows for the quota, against moto (an emulator: no real AWS
    here), which cannot answer for EC2 quotas: SKIP with why; a value given: PASS with room."""
    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings())
    status, detail, _ = p.quota_report()  # type: ignore[attr-defined]
    assert status == "SKIP" and "L-34B43A08" in detail and "not readable" in detail
    used = p.backend._in_use(True)  # type: ignore[attr-defined]
    monkeypatch.setattr(p.ctx, "quota_value", lambda service, code: (used + 9.0, ""))  # type: ignore[attr-defined]
    status, detail, _ = p.quota_report()  # type: ignore[attr-defined]
    assert status == "PASS" and "room for 4 more workers of 2 vCPUs" in detail
    bad = provider_named("aws", fleet, aws.ec2_settings(instance_type="c5.hugelarge"))
    assert bad.quota_report()[0] == "FAIL"  # type: ignore[attr-defined]


def test_gateway_workers_get_their_token_through_ssm_only(aws: Aws) -> None:
    """Gateway mode in moto (an emulator: no real AWS here): workers get the server and their
    worker token as parameters, no store or blob credentials, and the token is not in the
    user data."""
    from dataclasses import replace

    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings(market="on-demand"))
    gateway = replace(spec(fleet), server="https://gw.internal:8443", token="wtok-Sup3rSecret")
    [m] = p.launch(1, gateway)
    assert m.phase == "launching"
    assert {x["Name"].rsplit("/", 1)[1]: x["Value"] for x in aws.parameters(fleet)} == {
        "JOBFLEET_SERVER": "https://gw.internal:8443", "JOBFLEET_TOKEN": "wtok-Sup3rSecret"}
    raw = aws.client("ec2").describe_instance_attribute(InstanceId=m.id,
                                                        Attribute="userData")["UserData"]
    script = base64.b64decode(raw["Value"]).decode()
    assert "wtok-Sup3rSecret" not in script and "--spot-watch" not in script
    assert_no_credentials(script)
    assert down(p, wait=10) == [] and aws.parameters(fleet) == []


def test_aws_refusals_are_reported_not_raised_raw(aws: Aws,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An identity without the SSM or EC2 permissions, in moto (an emulator: no real AWS
    here): the refusal is replayed the way AWS sends it."""
    from botocore.exceptions import ClientError

    from jobfleet.fleet.autoscale import FleetError

    def denied(**kw: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException",
                                     "Message": "not authorized to perform ssm:PutParameter"}},
                          "PutParameter")

    fleet = fleet_name()
    p = provider_named("aws", fleet, aws.ec2_settings())
    monkeypatch.setattr(p.ctx.client("ssm"), "put_parameter", denied)  # type: ignore[attr-defined]
    machines = p.launch(2, spec(fleet))
    assert [m.phase for m in machines] == ["failed"] * 2
    assert "AccessDeniedException" in str(machines[0].reason)
    assert "control side's IAM policy" in str(machines[0].reason)
    assert aws.instances(fleet) == []  # nothing started without its environment
    monkeypatch.setattr(p.ctx.client("ec2"), "describe_instances", denied)  # type: ignore[attr-defined]
    with pytest.raises(FleetError, match="listing fleet .* AccessDeniedException"):
        p.list()
