"""The `kubernetes` provider: workers as the pods of a Job (or a Deployment) in a namespace,
through the official client (the `kubernetes` extra).

Each launch is one group: a Job with parallelism n (or a Deployment with n replicas) named
`jobfleet-FLEET-XXXXXX`, and a Secret `jobfleet-FLEET-XXXXXX-env` that holds the workers'
environment (the store's URL and credentials) and that the pods read with `envFrom`. Every
object carries the labels `jobfleet.io/fleet`, `jobfleet.io/run` and `jobfleet.io/worker`
(the group); `list` selects pods by the fleet's label, and each pod is one worker named after
it. The Secret is owned by its Job or Deployment, so Kubernetes deletes it with them; teardown
deletes both. The manifests are built by `kubernetes_manifests`, and pods are read by
`kubernetes_status`, both pure; this module makes the calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jobfleet.errors import ConfigError, JobfleetError
from jobfleet.fleet.base import (
    FAILED,
    LAUNCHING,
    READY,
    LaunchSpec,
    Machine,
    OnChange,
    Provider,
)
from jobfleet.fleet.kubernetes_manifests import (
    CONTAINER,
    KubeSettings,
    check_label_value,
    deletion_cost_patch,
    deployment_manifest,
    describe_settings,
    group_name,
    job_manifest,
    owner_reference,
    parse_settings,
    resume,
    scale,
    secret_manifest,
    secret_name,
    selector,
)
from jobfleet.fleet.kubernetes_status import (
    alive,
    broken,
    failure_for,
    group_machines,
    group_of,
    latest_failures,
    pod_machine,
    wanted,
)

#: lines of a failed worker's log that its Machine carries
LOG_TAIL = 20
#: seconds an API call may take
REQUEST_TIMEOUT = 30
#: launches whose every worker failed (while none is ready) before launch() starts no more
BROKEN_LAUNCHES = 2
_MERGE = "application/merge-patch+json"


class KubernetesError(JobfleetError):
    """The Kubernetes API refused or did not answer."""


def _client() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise ConfigError("the kubernetes provider needs the official Kubernetes client",
                          hint="pip install 'jobfleet[kubernetes]'") from None
    return kubernetes


def connect(s: KubeSettings) -> Any:
    """An ApiClient for the cluster the settings name (kubeconfig and context; in a pod,
    its service account), loaded without any API call."""
    k8s = _client()
    path = s.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    first = os.path.expanduser(path.split(os.pathsep)[0])
    try:
        if s.kubeconfig or s.context or os.path.exists(first):
            if not os.path.exists(first):
                raise FileNotFoundError(f"no kubeconfig at {first}")
            return k8s.config.new_client_from_config(
                config_file=os.path.expanduser(path), context=s.context, persist_config=False)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = type.__call__(k8s.client.Configuration)
            k8s.config.load_incluster_config(client_configuration=cfg)
            return k8s.client.ApiClient(cfg)
    except (k8s.config.ConfigException, OSError, KeyError, ValueError, TypeError) as e:
        where = f"{path}" + (f", context {s.context!r}" if s.context else "")
        raise ConfigError(f"providers.kubernetes: cannot load the cluster's settings ({where}):"
                          f" {e}", hint="check that `kubectl"
                          + (f" --context {s.context}" if s.context else "")
                          + " get pods` works, or set kubeconfig and context in"
                            " [providers.kubernetes]") from None
    raise ConfigError("providers.kubernetes: no cluster to talk to: no kubeconfig at"
                      f" {path}, and this is not a pod",
                      hint="set kubeconfig (and context) in [providers.kubernetes], or"
                           " KUBECONFIG")


class KubernetesProvider(Provider):
    """Workers as pods of Jobs (or Deployments) in one namespace."""

    name = "kubernetes"

    def __init__(self, fleet: str, settings: Mapping[str, object],
                 on_change: OnChange | None = None) -> None:
        super().__init__(fleet, settings, on_change)
        self.s = parse_settings(settings)  # every setting checked before any call
        check_label_value(fleet)
        self.api = connect(self.s)
        k8s = _client()
        self.core = k8s.client.CoreV1Api(self.api)
        self.groups = (k8s.client.BatchV1Api(self.api) if self.s.kind == "job"
                       else k8s.client.AppsV1Api(self.api))
        self._events = True  # may we list events (FailedCreate reasons)? see docs' RBAC
        self._logs: dict[tuple[str, str, int], tuple[str, ...]] = {}
        # from the last list(): groups whose every worker failed, and whether any is ready
        self._broken: dict[str, str] = {}
        self._ready = False

    # -- calls -----------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False,
              raw: bool = False, **kw: Any) -> Any:
        """One API call; its answer as JSON (camelCase dicts), or as text with `raw`;
        KubernetesError when refused."""
        k8s = _client()
        import urllib3

        try:
            got = fn(*args, _request_timeout=REQUEST_TIMEOUT, _preload_content=not raw, **kw)
            if raw:
                data = got.data if hasattr(got, "data") else got.read()
                return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        except k8s.client.exceptions.ApiException as e:
            if missing_ok and e.status == 404:
                return None
            raise self._refused(what, e) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubernetesError(
                f"kubernetes: cannot reach the API server at {self.api.configuration.host}"
                f" to {what}: {e}",
                hint="check that `kubectl get pods` works from here (network, VPN, context)"
            ) from None
        return self.api.sanitize_for_serialization(got)

    def _refused(self, what: str, e: Any) -> KubernetesError:
        try:
            message = json.loads(e.body).get("message") or e.reason
        except (TypeError, ValueError, AttributeError):
            message = e.reason
        ns = self.s.namespace
        hints = {
            401: "the cluster refused the credentials: log in again (`kubectl get pods"
                 f" -n {ns}` tells), or set context in [providers.kubernetes]",
            403: f"give the account the Role in docs/providers/kubernetes.md (namespace {ns})",
            404: f"create the namespace (kubectl create namespace {ns}), or set namespace in"
                 " [providers.kubernetes]",
            422: "a setting in [providers.kubernetes] made a manifest the cluster refuses",
        }
        return KubernetesError(f"kubernetes: cannot {what} (HTTP {e.status}): {message}",
                               hint=hints.get(e.status, "see docs/providers/kubernetes.md"))

    def _list(self, what: str, fn: Callable[..., Any], **kw: Any) -> list[dict[str, Any]]:
        got = self._call(f"list {what} in namespace {self.s.namespace}", fn, self.s.namespace,
                         **kw)
        return list(got.get("items") or [])

    def _pods(self) -> list[dict[str, Any]]:
        return self._list("pods", self.core.list_namespaced_pod,
                          label_selector=selector(self.fleet))

    def _groups(self) -> list[dict[str, Any]]:
        fn = (self.groups.list_namespaced_job if self.s.kind == "job"
              else self.groups.list_namespaced_deployment)
        return self._list(f"{self.s.kind}s", fn, label_selector=selector(self.fleet))

    def _create_group(self, body: dict[str, Any]) -> dict[str, Any]:
        fn = (self.groups.create_namespaced_job if self.s.kind == "job"
              else self.groups.create_namespaced_deployment)
        return dict(self._call(f"create {self.s.kind} {body['metadata']['name']}", fn,
                               self.s.namespace, body))

    def _patch_group(self, name: str, body: dict[str, Any]) -> None:
        fn = (self.groups.patch_namespaced_job if self.s.kind == "job"
              else self.groups.patch_namespaced_deployment)
        self._call(f"change {self.s.kind} {name}", fn, name, self.s.namespace, body,
                   _content_type=_MERGE)

    def _delete_group(self, name: str) -> None:
        """The Job or Deployment (its pods drain: Kubernetes gives them their grace period),
        then its Secret."""
        fn = (self.groups.delete_namespaced_job if self.s.kind == "job"
              else self.groups.delete_namespaced_deployment)
        self._call(f"delete {self.s.kind} {name}", fn, name, self.s.namespace,
                   propagation_policy="Background", missing_ok=True)
        self._call(f"delete secret {secret_name(name)}", self.core.delete_namespaced_secret,
                   secret_name(name), self.s.namespace, missing_ok=True)

    # -- the interface -----------------------------------------------------------------------

    def launch(self, n: int, spec: LaunchSpec) -> list[Machine]:
        if n <= 0:
            return []
        group = group_name(self.fleet, secrets.token_hex(3))
        kind = self.s.kind
        if len(self._broken) >= BROKEN_LAUNCHES and not self._ready:
            # an image that does not pull, a worker that crashes: more pods would fail alike
            why = "; ".join(f"{g}: {r}" for g, r in sorted(self._broken.items())[:2])
            return self._failed(group, n, spec, f"not starting more pods: every worker of the"
                                f" last {len(self._broken)} launches failed ({why})")
        body = (job_manifest(self.s, spec, group, n) if kind == "job"
                else deployment_manifest(self.s, spec, group))
        created = None
        try:
            # the group first, holding its pods back (suspended, or no replicas); then the
            # Secret, owned by it; then its pods may start
            created = self._create_group(body)
            secret = secret_manifest(self.s, spec, group, owner_reference(kind, created),
                                     spec.worker_env())
            self._call(f"create secret {secret_name(group)}",
                       self.core.create_namespaced_secret, self.s.namespace, secret)
            self._patch_group(group, resume(kind, n))
        except JobfleetError as e:
            if created is not None:  # else list() shows it, and fleet down deletes it
                with contextlib.suppress(JobfleetError):
                    self._delete_group(group)
            return self._failed(group, n, spec, e.message)
        machines = [Machine(f"{group}/{i}", self.name, self.fleet, LAUNCHING,
                            run_id=spec.run_id) for i in range(n)]
        for m in machines:
            self.on_change(m)
        return machines

    def _failed(self, group: str, n: int, spec: LaunchSpec, reason: str) -> list[Machine]:
        machines = [Machine(f"{group}/{i}", self.name, self.fleet, FAILED, run_id=spec.run_id,
                            reason=reason) for i in range(n)]
        for m in machines:
            self.on_change(m)
        return machines

    def list(self) -> list[Machine]:
        pods = self._pods()
        groups = self._groups()
        machines = []
        by_group: dict[str, list[dict[str, Any]]] = {}
        of_group: dict[str, list[Machine]] = {}
        for pod in pods:
            m, log = pod_machine(pod, self.fleet)
            if log is not None:
                m = Machine(m.id, m.provider, m.fleet, m.phase, m.worker_id, m.host, m.run_id,
                            m.reason, self._log_tail(pod, log == "previous"))
            machines.append(m)
            by_group.setdefault(group_of(pod) or "", []).append(pod)
            of_group.setdefault(group_of(pod) or "", []).append(m)
        failures: dict[str, str] = {}
        if any(wanted(self.s.kind, g, by_group.get(g["metadata"]["name"], []))
               > sum(alive(p) for p in by_group.get(g["metadata"]["name"], []))
               for g in groups):
            failures = self._failures()
        for g in groups:
            name = g["metadata"]["name"]
            more = group_machines(self.s.kind, g, by_group.get(name, []), self.fleet,
                                  failure_for(name, failures))
            machines += more
            of_group.setdefault(name, []).extend(more)
        self._broken = broken(of_group)
        self._ready = any(m.phase == READY for m in machines)
        return sorted(machines, key=lambda m: m.id)

    def _failures(self) -> dict[str, str]:
        """Why controllers could not create pods (quota, admission): FailedCreate events."""
        if not self._events:
            return {}
        try:
            events = self._list("events", self.core.list_namespaced_event,
                                field_selector="reason=FailedCreate")
        except KubernetesError:
            self._events = False  # not allowed (the Role leaves events out): do without
            return {}
        return latest_failures(events)

    def _log_tail(self, pod: Mapping[str, Any], previous: bool) -> tuple[str, ...]:
        meta = pod["metadata"]
        restarts = max([cs.get("restartCount", 0)
                        for cs in pod.get("status", {}).get("containerStatuses") or []] or [0])
        key = (meta.get("uid") or meta["name"], "previous" if previous else "current", restarts)
        if key not in self._logs:
            if len(self._logs) > 1000:  # pods long gone
                self._logs.clear()
            try:
                text = self._call(f"read the log of pod {meta['name']}",
                                  self.core.read_namespaced_pod_log, meta["name"],
                                  self.s.namespace, container=CONTAINER, tail_lines=LOG_TAIL,
                                  previous=previous, raw=True)
            except KubernetesError:
                text = ""
            self._logs[key] = tuple(str(text or "").splitlines()[-LOG_TAIL:])
        return self._logs[key]

    def terminate(self, ids: Sequence[str]) -> None:
        """Pods named in `ids` are deleted (their workers get SIGTERM and drain for
        drain_seconds) and their group scaled down by as many; `GROUP/i` lowers its group's
        count; a group brought to nothing is deleted with its Secret."""
        if not ids:
            return
        kind = self.s.kind
        pods = {p["metadata"]["name"]: p for p in self._pods()}
        groups = {g["metadata"]["name"]: g for g in self._groups()}
        members: dict[str, list[dict[str, Any]]] = {}
        for pod in pods.values():
            members.setdefault(group_of(pod) or "", []).append(pod)
        chosen: dict[str, list[dict[str, Any]]] = {}
        fewer: dict[str, int] = {}
        whole: set[str] = set()
        for i in ids:
            if i.startswith(f"{kind}/"):
                whole.add(i.split("/", 1)[1])
            elif "/" in i:
                group = i.rsplit("/", 1)[0]
                fewer[group] = fewer.get(group, 0) + 1
            elif i in pods:
                group = group_of(pods[i]) or ""
                chosen.setdefault(group, []).append(pods[i])
        for group in sorted(set(chosen) | set(fewer) | whole):
            mine = chosen.get(group, [])
            if group not in groups:  # a pod whose group is gone: delete it alone
                for pod in mine:
                    self._delete_pod(pod)
                continue
            left = (wanted(kind, groups[group], members.get(group, []))
                    - sum(alive(p) for p in mine) - fewer.get(group, 0))
            if group in whole or left <= 0:
                self._delete_group(group)  # and its pods with it
                continue
            if kind == "deployment":
                # the ReplicaSet removes these first when scaled down: no replacement starts
                for pod in mine:
                    if alive(pod):
                        self._call(f"mark pod {pod['metadata']['name']}",
                                   self.core.patch_namespaced_pod, pod["metadata"]["name"],
                                   self.s.namespace, deletion_cost_patch(),
                                   _content_type=_MERGE, missing_ok=True)
                self._patch_group(group, scale(kind, left))
            else:
                # deleted first (with podReplacementPolicy Failed nothing replaces a pod
                # that drains), then the Job asks for fewer
                for pod in mine:
                    self._delete_pod(pod)
                self._patch_group(group, scale(kind, left))

    def _delete_pod(self, pod: Mapping[str, Any]) -> None:
        name = pod["metadata"]["name"]
        self._call(f"delete pod {name}", self.core.delete_namespaced_pod, name,
                   self.s.namespace, missing_ok=True)

    def describe(self) -> dict[str, object]:
        return {"provider": self.name, "fleet": self.fleet,
                "where": f"{self.api.configuration.host}"
                         + (f" (context {self.s.context})" if self.s.context else ""),
                **describe_settings(self.s)}

    def close(self) -> None:
        close = getattr(self.api, "close", None)
        if callable(close):
            close()
