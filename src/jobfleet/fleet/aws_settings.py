"""The settings of `[providers.aws]`, parsed and checked without calling AWS: which mode
(EC2 instances or ECS tasks on Fargate), where, what each worker is, and the Fargate CPU and
memory pairs AWS accepts.

What only AWS can answer (does the instance type exist, does the instance profile) is checked
by the provider before its first call that creates something (`AwsProvider.check`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from jobfleet.errors import ConfigError
from jobfleet.spec.model import parse_bool, parse_size

MODES = ("ec2", "ecs")
MARKETS = ("spot", "on-demand", "spot-with-fallback")
ON_QUOTA = ("waves", "stop")
#: settings every mode has, then each mode's own
COMMON = ("mode", "region", "image", "security_groups", "on_quota", "kms_key")
EC2_ONLY = ("instance_type", "market", "subnet", "instance_profile", "key_name", "install",
            "python", "setup", "volume_size")
ECS_ONLY = ("cluster", "cpu", "memory", "task_role", "execution_role", "subnets",
            "assign_public_ip", "log_group")
_MIB = 1024 * 1024
_GIB_IN_MIB = 1024

#: Fargate (Linux): task CPU units -> the memory sizes (MiB) AWS accepts with it, as
#: (first, last, step). From the ECS developer guide's table of task CPU and memory.
FARGATE = {
    256: ((512, 512, 1), (1024, 2048, 1024)),
    512: ((1024, 4096, 1024),),
    1024: ((2048, 8192, 1024),),
    2048: ((4096, 16384, 1024),),
    4096: ((8192, 30720, 1024),),
    8192: ((16384, 61440, 4096),),
    16384: ((32768, 122880, 8192),),
}

_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+\Z")
_AMI = re.compile(r"ami-[0-9a-f]{8,17}\Z")
_REGION = re.compile(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d\Z")
_CPU_TEXT = re.compile(r"([\d.]+)\s*v?cpus?\Z", re.I)
T = TypeVar("T")
D = TypeVar("D")


def fargate_memories(cpu: int) -> list[int]:
    """The memory sizes (MiB) Fargate accepts with `cpu` units (none for an unknown cpu)."""
    return [m for first, last, step in FARGATE.get(cpu, ()) for m in range(first, last + 1, step)]


def _gib(mib: int) -> str:
    return f"{mib / _GIB_IN_MIB:g} GiB"


def describe_memories(cpu: int) -> str:
    """Fargate's memory choices for `cpu`, in words: `1 GiB to 4 GiB in 1 GiB steps`."""
    parts = []
    for first, last, step in FARGATE[cpu]:
        if first == last:
            parts.append(_gib(first))
        else:
            parts.append(f"{_gib(first)} to {_gib(last)} in {_gib(step)} steps")
    return ", ".join(parts)


def check_fargate(cpu: int, memory: int) -> None:
    """ConfigError listing the valid choices unless Fargate accepts `cpu` units with `memory`
    MiB."""
    if cpu not in FARGATE:
        raise ConfigError(
            f"providers.aws: cpu = {cpu} is not a Fargate task size",
            hint="cpu is in CPU units (1024 = 1 vCPU); Fargate accepts "
                 + ", ".join(f"{c} ({c / 1024:g} vCPU)" for c in FARGATE))
    if memory not in fargate_memories(cpu):
        raise ConfigError(
            f"providers.aws: Fargate does not run cpu = {cpu} with memory = {memory} MiB"
            f" ({_gib(memory)})",
            hint=f"with cpu = {cpu}, memory may be {describe_memories(cpu)};"
                 " other cpu values: " + "; ".join(
                     f"{c}: {describe_memories(c)}" for c in FARGATE if c != cpu))


@dataclass(frozen=True, slots=True)
class AwsSettings:
    """`[providers.aws]`, checked."""

    mode: str
    region: str
    image: str  # ec2: an AMI id; ecs: the worker's container image
    security_groups: tuple[str, ...] = ()
    on_quota: str = "waves"
    kms_key: str | None = None  # the KMS key of the SecureString parameters (default aws/ssm)
    # ec2
    instance_type: str | None = None
    market: str = "spot"
    subnets: tuple[str, ...] = ()  # ec2: `subnet` (one or a list); ecs: `subnets`
    instance_profile: str | None = None
    key_name: str | None = None
    install: str | None = None  # the pip requirement that installs jobfleet on instances
    python: str = "python3"
    setup: str = ""  # shell lines run (as root) before jobfleet is installed
    volume_size: int | None = None  # GiB of the root volume
    # ecs
    cluster: str | None = None
    cpu: int | None = None  # CPU units
    memory: int | None = None  # MiB
    task_role: str | None = None
    execution_role: str | None = None
    assign_public_ip: bool = False
    log_group: str | None = None


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("it must be a non-empty string")
    return value.strip()


def _ids(value: object, prefix: str, what: str) -> tuple[str, ...]:
    """AWS resource ids like subnet-0abc1234, from a list or a comma-separated string."""
    pattern = re.compile(prefix + r"-[0-9a-f]{8,17}\Z")
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError(f"it must be a list of {what} ids, or one string of them")
    bad = [v for v in items if not pattern.match(v)]
    if bad or not items:
        raise ValueError(f"{', '.join(bad) or 'nothing'}: not {what} ids"
                         f" (like {prefix}-0abc12345678)")
    return tuple(items)


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"choose one of: {', '.join(choices)}")
        return text
    return parse


def _cpu_units(value: object) -> int:
    """CPU units from 1024, "1024", "1 vCPU" or "0.5vcpu"."""
    if isinstance(value, bool):
        raise ValueError("it must be CPU units (1024 = 1 vCPU) or e.g. '2 vCPU'")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    m = _CPU_TEXT.match(text)
    if not m:
        raise ValueError("it must be CPU units (1024 = 1 vCPU) or e.g. '2 vCPU'")
    return round(float(m.group(1)) * 1024)


def _memory_mib(value: object) -> int:
    """MiB from 2048, "2048" or a size with a unit ("2GiB", "512MiB")."""
    if isinstance(value, bool):
        raise ValueError("it must be MiB, or a size like 2GiB")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    size = parse_size(text)
    if size % _MIB:
        raise ValueError("it must be a whole number of MiB")
    return size // _MIB


def _volume(value: object) -> int:
    n = int(str(value).strip())
    if not 8 <= n <= 16384:
        raise ValueError("it must be between 8 and 16384 GiB")
    return n


def _get(settings: Mapping[str, object], name: str, parse: Callable[[object], T],
         default: D) -> T | D:
    """Setting `name` parsed, or `default` when it is not set."""
    raw = settings.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"providers.aws: {name} = {raw!r}: {e}",
                          hint=f"fix {name} in [providers.aws] of jobfleet.toml") from None


def _need(settings: Mapping[str, object], name: str, parse: Callable[[object], T],
          why: str) -> T:
    """Setting `name` parsed; ConfigError saying `why` it is needed when it is not set."""
    value = _get(settings, name, parse, None)
    if value is None:
        raise ConfigError(f"providers.aws: {name} is not set; {why}",
                          hint=f"set {name} in [providers.aws] of jobfleet.toml"
                               " (docs/providers/aws.md shows a full example)")
    return value


def parse_settings(settings: Mapping[str, object],
                   env: Mapping[str, str] | None = None) -> AwsSettings:
    """The provider's settings, checked; ConfigError with the valid choices when one is bad."""
    env = os.environ if env is None else env
    known = (*COMMON, *EC2_ONLY, *ECS_ONLY)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"providers.aws has no setting {', '.join(map(repr, unknown))}",
                          hint=f"settings are: {', '.join(known)}")
    mode = str(_get(settings, "mode", _choice(MODES), "ec2"))
    other = ECS_ONLY if mode == "ec2" else EC2_ONLY
    stray = [k for k in settings if k in other]
    if stray:
        raise ConfigError(f"providers.aws: {', '.join(stray)} belong to mode"
                          f" {'ecs' if mode == 'ec2' else 'ec2'}, and mode is {mode}",
                          hint=f"{mode} settings are: "
                               f"{', '.join((*COMMON, *(EC2_ONLY if mode == 'ec2' else ECS_ONLY)))}")
    region = _get(settings, "region", _text, None) or env.get("AWS_REGION") or env.get(
        "AWS_DEFAULT_REGION")
    if not region:
        raise ConfigError("providers.aws: region is not set (nor AWS_REGION)",
                          hint="set region in [providers.aws], e.g. region = \"eu-west-1\"")
    if not _REGION.match(str(region)):
        raise ConfigError(f"providers.aws: region = {region!r} is not an AWS region name",
                          hint="write it like us-east-1 or eu-west-1")
    common: dict[str, Any] = {
        "mode": mode, "region": str(region),
        "security_groups": _get(settings, "security_groups",
                                lambda v: _ids(v, "sg", "security group"), ()),
        "on_quota": _get(settings, "on_quota", _choice(ON_QUOTA), "waves"),
        "kms_key": _get(settings, "kms_key", _text, None),
    }
    if mode == "ec2":
        return _ec2(settings, common)
    return _ecs(settings, common)


def _ec2(settings: Mapping[str, object], common: dict[str, Any]) -> AwsSettings:
    instance_type = _need(settings, "instance_type", _text,
                          "workers need an instance type, e.g. c6i.large")
    if not _INSTANCE_TYPE.match(instance_type):
        raise ConfigError(f"providers.aws: instance_type = {instance_type!r} is not an"
                          " instance type name", hint="write it like c6i.large or m7g.xlarge")
    image = _need(settings, "image", _text, "EC2 workers need an AMI id (an image with"
                                            " Python 3.11+)")
    if not _AMI.match(image):
        raise ConfigError(f"providers.aws: image = {image!r} is not an AMI id",
                          hint="in mode ec2, image is an AMI id like ami-0abcdef1234567890")
    profile = _need(settings, "instance_profile", _text,
                    "workers get their AWS credentials from an instance profile (access keys"
                    " are never copied onto machines)")
    return AwsSettings(
        image=image, instance_type=instance_type, instance_profile=profile,
        market=_get(settings, "market", _choice(MARKETS), "spot"),
        subnets=_get(settings, "subnet", lambda v: _ids(v, "subnet", "subnet"), ()),
        key_name=_get(settings, "key_name", _text, None),
        install=_get(settings, "install", _text, None),
        python=_get(settings, "python", _text, "python3"),
        setup=_get(settings, "setup", str, ""),
        volume_size=_get(settings, "volume_size", _volume, None),
        **common)


def _ecs(settings: Mapping[str, object], common: dict[str, Any]) -> AwsSettings:
    cluster = _need(settings, "cluster", _text, "tasks run in an ECS cluster")
    image = _need(settings, "image", _text,
                  "ECS workers run a container image with jobfleet installed")
    cpu = _need(settings, "cpu", _cpu_units,
                "Fargate tasks need a size (CPU units, 1024 = 1 vCPU)")
    memory = _need(settings, "memory", _memory_mib, "Fargate tasks need a memory size (MiB)")
    check_fargate(cpu, memory)
    task_role = _need(settings, "task_role", _text,
                      "workers get their AWS credentials (S3, their parameters) from a task"
                      " role (access keys are never put in task definitions)")
    execution_role = _need(settings, "execution_role", _text,
                           "ECS needs it to pull the image and hand the worker its"
                           " SecureString parameters")
    subnets = _need(settings, "subnets", lambda v: _ids(v, "subnet", "subnet"),
                    "Fargate tasks need a subnet")
    if not common["security_groups"]:
        raise ConfigError("providers.aws: security_groups is not set; Fargate tasks need one",
                          hint="set security_groups in [providers.aws] of jobfleet.toml (one"
                               " that allows outbound traffic to the store and S3)")
    return AwsSettings(
        image=image, cluster=cluster, cpu=cpu, memory=memory, task_role=task_role,
        execution_role=execution_role, subnets=subnets,
        assign_public_ip=_get(settings, "assign_public_ip", parse_bool, False),
        log_group=_get(settings, "log_group", _text, None),
        **common)
