"""The kubernetes provider's settings and the objects it creates, as pure functions: settings
table -> `KubeSettings` (refused with a ConfigError before anything is created), and
(settings, LaunchSpec) -> the JSON manifests of a Secret, a Job or a Deployment.

Manifests are plain dicts in the API's own spelling (camelCase), what `kubectl get -o json`
shows; the official client sends them as they are. The store's URL and credentials are only
in the Secret: the pod template names the Secret (`envFrom`), never a value from it.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, TypeVar, cast

from jobfleet.errors import ConfigError
from jobfleet.fleet.base import LaunchSpec, option
from jobfleet.spec.model import parse_duration

#: the settings of [providers.kubernetes]
SETTINGS = ("namespace", "image", "kind", "cpu", "memory", "gpus", "node_selector", "affinity",
            "tolerations", "service_account", "image_pull_secrets", "context", "kubeconfig",
            "drain_seconds")
#: what workers run as: pods of a Job (the default: see docs/providers/kubernetes.md) or of a
#: Deployment
KINDS = ("job", "deployment")
FLEET_LABEL, RUN_LABEL, WORKER_LABEL = "jobfleet.io/fleet", "jobfleet.io/run", "jobfleet.io/worker"
MANAGED_BY = {"app.kubernetes.io/managed-by": "jobfleet"}
#: the run label of workers that serve any run
ANY_RUN = "any"
CONTAINER = "worker"
GPU_RESOURCE = "nvidia.com/gpu"
#: Kubernetes keeps a finished Job (and its pods and Secret) this long, seconds
FINISHED_TTL = 3600
#: terminationGracePeriodSeconds is drain_seconds plus this: the worker kills what is still
#: running when its drain ends, then reports and exits
DRAIN_MARGIN = 15
#: the annotation that makes a ReplicaSet remove these pods first when scaled down
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_ENV_NAME = re.compile(r"[-._a-zA-Z0-9]+\Z")
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|[numkMGTPE])?\Z")
_SUFFIX = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
           "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2**10),
           "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
           "Pi": Decimal(2**50), "Ei": Decimal(2**60)}
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
T = TypeVar("T")


def parse_quantity(text: object) -> Decimal:
    """A Kubernetes quantity (`500m`, `2`, `1.5Gi`, `1e9`) as a number."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError("it must be a Kubernetes quantity such as 500m, 2, 512Mi or 4Gi")
    m = _QUANTITY.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (such as 500m, 2, 512Mi, 4Gi)")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        if abs(int(suffix[1:])) > 30:
            raise ValueError(f"{text!r} is out of range")
        return number * Decimal(10) ** int(suffix[1:])
    return number * _SUFFIX[suffix]


def _cpu(value: object) -> str:
    cores = parse_quantity(value)
    if cores < Decimal("0.001"):
        raise ValueError("it must be at least 1m (a thousandth of a core)")
    return str(value).strip()


def _memory(value: object) -> str:
    text = str(value).strip()
    if text.endswith("m"):
        raise ValueError(f"{text!r} means thousandths of a byte; write {text[:-1]}Mi or"
                         f" {text[:-1]}M for mebibytes or megabytes")
    amount = parse_quantity(value)
    if amount < 2**20:
        raise ValueError("it must be at least 1Mi (a worker needs some 100Mi)")
    return text


def _gpus(value: object) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError("it must be a whole number of GPUs, 0 or more")
    return int(str(value).strip())


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("it must be a non-empty string")
    return value.strip()


def _image(value: object) -> str:
    text = _text(value)
    if any(c.isspace() for c in text) or "://" in text or text.startswith("-"):
        raise ValueError("it must be an image reference such as registry.example/jobfleet:0.1.0")
    return text


def _name(pattern: re.Pattern[str], what: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value)
        if not pattern.match(text):
            raise ValueError(f"it must be {what}")
        return text
    return parse


_namespace = _name(_DNS_LABEL, "a namespace name: lower-case letters, digits and '-', up to 63")
_object_name = _name(_DNS_SUBDOMAIN, "an object name: lower-case letters, digits, '-' and '.'")


def _kind(value: object) -> str:
    kind = _text(value).lower()
    if kind not in KINDS:
        raise ValueError(f"it must be one of: {', '.join(KINDS)}")
    return kind


def _names(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("it must be a list of Secret names")
    return [_object_name(v) for v in items]


def _node_selector(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("it must be a table of node labels, such as {\"disktype\" = \"ssd\"}")
    selector = {}
    for key, raw in value.items():
        text = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if not _LABEL_KEY.match(str(key)):
            raise ValueError(f"{key!r} is not a label key")
        if isinstance(raw, dict | list) or not _LABEL_VALUE.match(text):
            raise ValueError(f"{key} = {raw!r}: not a label value (up to 63 letters, digits,"
                             " '-', '_' or '.')")
        selector[str(key)] = text
    return selector


def _tolerations(value: object) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("it must be a list of tables, such as"
                         " [{key = \"gpu\", operator = \"Exists\", effect = \"NoSchedule\"}]")
    for i, t in enumerate(value):
        check_shape(t, "V1Toleration", f"tolerations[{i}]")
        if t.get("operator", "Equal") not in _TOLERATION_OPERATORS:
            raise ValueError(f"tolerations[{i}].operator must be one of:"
                             f" {', '.join(_TOLERATION_OPERATORS)}")
        if t.get("effect", "") not in ("", *_TAINT_EFFECTS):
            raise ValueError(f"tolerations[{i}].effect must be one of: {', '.join(_TAINT_EFFECTS)}")
        if t.get("operator") == "Exists" and t.get("value"):
            raise ValueError(f"tolerations[{i}]: operator Exists takes no value")
    return [dict(t) for t in value]


def _affinity(value: object) -> dict[str, Any]:
    check_shape(value, "V1Affinity", "affinity")
    return dict(cast(dict[str, Any], value))


def check_shape(value: object, model: str, path: str) -> None:
    """Is `value` (camelCase, as in a manifest) shaped like the official client's `model`?
    Every key must be one of its fields, recursively, with the right kind of value; ValueError
    naming the first that is not. Required fields are left to the API server."""
    from kubernetes import client  # the provider has checked that it is installed

    cls = getattr(client, model, None)
    if cls is None:  # a client too old or too new to know it: the API server will judge
        return
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be a table (the fields of a Kubernetes {model[2:]})")
    fields = {camel: cast(str, cls.openapi_types[snake])
              for snake, camel in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise ValueError(f"{path}.{key} is not a field of a Kubernetes {model[2:]};"
                             f" its fields are: {', '.join(sorted(fields))}")
        _check_type(item, fields[key], f"{path}.{key}")


def _check_type(value: object, kind: str, path: str) -> None:
    # the client writes `list[V1X]` and `dict(str, str)` (up to 36), `List[V1X]` and
    # `Dict[str, str]` (37 on)
    if kind[:5].lower() == "list[":
        if not isinstance(value, list):
            raise ValueError(f"{path} must be a list")
        for i, item in enumerate(value):
            _check_type(item, kind[5:-1], f"{path}[{i}]")
    elif kind[:5].lower() in ("dict(", "dict["):
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a table")
        inner = kind[5:-1].split(",", 1)[1].strip()
        for key, item in value.items():
            _check_type(item, inner, f"{path}.{key}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be a whole number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false")
    elif kind.startswith("V1") or kind.startswith("V2"):
        check_shape(value, kind, path)


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """[providers.kubernetes], checked."""

    image: str
    namespace: str = "default"
    kind: str = "job"
    cpu: str | None = None  # a quantity: requests and limits of each worker's pod
    memory: str | None = None
    gpus: int | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    service_account: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    context: str | None = None  # of the kubeconfig; None: its current context
    kubeconfig: str | None = None  # None: $KUBECONFIG, ~/.kube/config, or in-cluster
    drain_seconds: float = 60.0  # how long a stopped worker's running jobs may finish

    @property
    def grace(self) -> int:
        """terminationGracePeriodSeconds of each worker's pod."""
        return math.ceil(self.drain_seconds) + DRAIN_MARGIN


def parse_settings(settings: Mapping[str, object]) -> KubeSettings:
    """[providers.kubernetes] checked, before any API call: ConfigError on the first problem."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"providers.kubernetes has no setting {unknown[0]!r}",
                          hint=f"its settings are: {', '.join(SETTINGS)}")

    def get(name: str, kind: Callable[[object], T], default: T) -> T:
        return cast(T, option("kubernetes", settings, name, kind, default))

    image = get("image", _image, "")
    if not image:
        raise ConfigError("providers.kubernetes: image is not set",
                          hint="set image in [providers.kubernetes] to an image with this"
                               " jobfleet installed (docs/providers/kubernetes.md has a"
                               " Dockerfile)")
    return KubeSettings(
        image=image,
        namespace=get("namespace", _namespace, "default"),
        kind=get("kind", _kind, "job"),
        cpu=get("cpu", _cpu, None),
        memory=get("memory", _memory, None),
        gpus=get("gpus", _gpus, None),
        node_selector=get("node_selector", _node_selector, {}),
        affinity=get("affinity", _affinity, None),
        tolerations=get("tolerations", _tolerations, []),
        service_account=get("service_account", _object_name, None),
        image_pull_secrets=get("image_pull_secrets", _names, []),
        context=get("context", _text, None),
        kubeconfig=get("kubeconfig", _text, None),
        drain_seconds=get("drain_seconds", parse_duration, 60.0),
    )


# --- names and labels ------------------------------------------------------------------------


def check_label_value(fleet: str) -> str:
    if not _LABEL_VALUE.match(fleet):
        raise ConfigError(f"fleet name {fleet!r} cannot be a Kubernetes label value",
                          hint="end it with a letter or a digit")
    return fleet


def group_name(fleet: str, token: str) -> str:
    """The name of one launch's Job or Deployment (and the prefix of its pods' names)."""
    return f"jobfleet-{fleet.replace('_', '-')}-{token}"


def secret_name(group: str) -> str:
    return f"{group}-env"


def labels(fleet: str, run_id: str | None, group: str) -> dict[str, str]:
    """The labels of every object a launch creates: `list` selects by the fleet's."""
    return {FLEET_LABEL: fleet, RUN_LABEL: run_id or ANY_RUN, WORKER_LABEL: group, **MANAGED_BY}


def selector(fleet: str) -> str:
    return f"{FLEET_LABEL}={fleet}"


# --- manifests ---------------------------------------------------------------------------------


def worker_spec(s: KubeSettings, spec: LaunchSpec) -> LaunchSpec:
    """The LaunchSpec each worker gets: it offers what its pod has (cpu, memory, gpus from the
    settings, else from the spec); under a Deployment it never exits on its own, since
    Kubernetes would start it again."""
    cpus = float(parse_quantity(s.cpu)) if s.cpu else spec.cpus
    memory = int(parse_quantity(s.memory)) if s.memory else spec.memory
    gpus = s.gpus if s.gpus is not None else spec.gpus
    idle = math.inf if s.kind == "deployment" else spec.idle_exit
    return replace(spec, cpus=cpus, memory=memory, gpus=gpus, idle_exit=idle)


def _quantity(value: float) -> str:
    return f"{value:g}" if value >= 1 else f"{math.ceil(value * 1000)}m"


def resources(s: KubeSettings, spec: LaunchSpec) -> dict[str, dict[str, str]]:
    """Requests equal to limits (the Guaranteed class: a worker is not evicted first, nor
    given less than it offers jobs)."""
    amounts: dict[str, str] = {}
    if s.cpu or spec.cpus:
        amounts["cpu"] = s.cpu or _quantity(cast(float, spec.cpus))
    if s.memory or spec.memory:
        amounts["memory"] = s.memory or str(spec.memory)
    limits = dict(amounts)
    gpus = s.gpus if s.gpus is not None else spec.gpus
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    out: dict[str, dict[str, str]] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def pod_template(s: KubeSettings, spec: LaunchSpec, group: str, *,
                 restart_policy: str) -> dict[str, Any]:
    """Each worker's pod: `jobfleet worker` named after its pod, its store from the Secret."""
    spec = worker_spec(s, spec)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.image,
        "command": ["jobfleet", "worker"],
        # Kubernetes puts the pod's name in place of $(POD_NAME): the worker's id
        "args": spec.worker_args("$(POD_NAME)"),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "JOBFLEET_DRAIN_SECONDS", "value": f"{s.drain_seconds:g}"},
        ],
        "envFrom": [{"secretRef": {"name": secret_name(group)}}],
    }
    res = resources(s, spec)
    if res:
        container["resources"] = res
    pod: dict[str, Any] = {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": s.grace,
        "containers": [container],
    }
    if s.service_account:
        pod["serviceAccountName"] = s.service_account
    else:  # workers need no access to the Kubernetes API
        pod["automountServiceAccountToken"] = False
    if s.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if s.affinity:
        pod["affinity"] = s.affinity
    if s.tolerations:
        pod["tolerations"] = [dict(t) for t in s.tolerations]
    return {"metadata": {"labels": labels(spec.fleet, spec.run_id, group)}, "spec": pod}


def _metadata(s: KubeSettings, spec: LaunchSpec, name: str, group: str) -> dict[str, Any]:
    return {"name": name, "namespace": s.namespace,
            "labels": labels(spec.fleet, spec.run_id, group)}


def job_manifest(s: KubeSettings, spec: LaunchSpec, group: str, n: int) -> dict[str, Any]:
    """`n` workers as the pods of one Job: a work queue (no completions), so a worker that
    exits because it is idle is done, and nothing replaces it. Created suspended: its pods
    start once the Secret they read exists (`resume`)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(s, spec, group, group),
        "spec": {
            "parallelism": n,
            "suspend": True,
            "backoffLimit": n,  # failed workers replaced: as many as there are workers
            "ttlSecondsAfterFinished": FINISHED_TTL,
            # a stopped worker drains first: replace it only once it has failed
            "podReplacementPolicy": "Failed",
            # a worker evicted or preempted is replaced without counting as a failure
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [
                {"type": "DisruptionTarget", "status": "True"}]}]},
            "template": pod_template(s, spec, group, restart_policy="Never"),
        },
    }


def deployment_manifest(s: KubeSettings, spec: LaunchSpec, group: str) -> dict[str, Any]:
    """Workers as the pods of one Deployment, created with none; `resume` scales it."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(s, spec, group, group),
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {FLEET_LABEL: spec.fleet, WORKER_LABEL: group}},
            "strategy": {"type": "Recreate"},
            "template": pod_template(s, spec, group, restart_policy="Always"),
        },
    }


def resume(kind: str, n: int) -> dict[str, Any]:
    """The merge patch that lets a created group start its `n` workers."""
    return {"spec": {"suspend": False}} if kind == "job" else {"spec": {"replicas": n}}


def scale(kind: str, n: int) -> dict[str, Any]:
    return {"spec": {"parallelism": n}} if kind == "job" else {"spec": {"replicas": n}}


def secret_manifest(s: KubeSettings, spec: LaunchSpec, group: str,
                    owner: Mapping[str, str] | None, env: Mapping[str, str]) -> dict[str, Any]:
    """The workers' environment (the store's URL and credentials), owned by their Job or
    Deployment so that Kubernetes deletes it with them in any case."""
    for key in env:
        if not _ENV_NAME.match(key):
            raise ConfigError(f"the worker variable {key!r} cannot be a Secret key",
                              hint="use letters, digits, '_', '-' and '.' in variable names")
    meta = _metadata(s, spec, secret_name(group), group)
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "immutable": True,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(env.items())},
    }


def owner_reference(kind: str, created: Mapping[str, Any]) -> dict[str, str]:
    meta = created["metadata"]
    api = "batch/v1" if kind == "job" else "apps/v1"
    return {"apiVersion": api, "kind": "Job" if kind == "job" else "Deployment",
            "name": meta["name"], "uid": meta["uid"]}


def deletion_cost_patch() -> dict[str, Any]:
    """Marks a pod for its ReplicaSet to remove first on the next scale-down."""
    return {"metadata": {"annotations": {DELETION_COST: "-1000"}}}


def describe_settings(s: KubeSettings) -> dict[str, object]:
    out: dict[str, object] = {"namespace": s.namespace, "kind": s.kind, "image": s.image,
                              "cpu": s.cpu, "memory": s.memory, "gpus": s.gpus}
    if s.node_selector:
        out["node_selector"] = ",".join(f"{k}={v}" for k, v in s.node_selector.items())
    return out

