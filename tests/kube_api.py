"""A stand-in for the Kubernetes API server, on 127.0.0.1, for the kubernetes provider's tests.

It is a stand-in, not Kubernetes: no real API server can run on this machine (there is no
container engine for kind or k3s, Debian bookworm packages etcd but not kube-apiserver, and
no package on PyPI carries one; see docs/providers/kubernetes.md). It speaks enough of the
REST API for the calls the provider makes through the official client: create, list (label
and field selectors), patch (merge patch), delete (with propagation) of pods, secrets, jobs,
deployments and events, and pods/log. Like the real one it checks a bearer token, answers
with Status objects (401, 403, 404, 409, 422), and can enforce RBAC rules. Small controllers
stand in for the Job and Deployment (ReplicaSet) controllers and the garbage collector:
pods are created from templates (or refused by a pod quota, with a FailedCreate event), scaled
down, and deleted with their owners. No scheduler or kubelet runs unless a test sets pods'
status (`set_status` and the status builders below) or attaches a `LocalKubelet`, which runs
each pod's command as a local process, with the environment its Secret gives it.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

#: (API group, resource) -> kind
KINDS = {("", "pods"): "Pod", ("", "secrets"): "Secret", ("", "events"): "Event",
         ("batch", "jobs"): "Job", ("apps", "deployments"): "Deployment",
         ("apps", "replicasets"): "ReplicaSet"}
_VERSIONS = {"": "v1", "batch": "batch/v1", "apps": "apps/v1"}
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")

Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    verb: str
    resource: str  # pods, pods/log, batch/jobs, ...
    content_type: str


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 merge patch (what the provider sends)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _split(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in selector:
        depth += c == "("
        depth -= c == ")"
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    return [p.strip() for p in parts + [cur] if p.strip()]


def label_match(selector: str, labels: dict[str, str]) -> bool:
    for term in _split(selector):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            values = {v.strip() for v in m.group(3).split(",")}
            if (labels.get(m.group(1)) in values) != (m.group(2) == "in"):
                return False
        elif "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(selector: str, obj: Obj) -> bool:
    for term in _split(selector):
        key, _, want = term.partition("=")
        value: Any = obj
        for part in key.strip().split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if str(value if value is not None else "") != want.strip():
            return False
    return True


# --- pod status builders (what a scheduler and a kubelet would write) --------------------


def unschedulable(message: str) -> Obj:
    return {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": message, "lastTransitionTime": now()}]}


def waiting(reason: str, message: str, *, node: str = "node-1", restarts: int = 0,
            last_exit: int | None = None) -> Obj:
    cs: Obj = {"name": "worker", "ready": False, "restartCount": restarts, "image": "x",
               "imageID": "", "state": {"waiting": {"reason": reason, "message": message}}}
    if last_exit is not None:
        cs["lastState"] = {"terminated": {"exitCode": last_exit, "reason": "Error",
                                          "startedAt": now(), "finishedAt": now()}}
    return {"phase": "Running" if restarts else "Pending", "hostIP": "10.0.0.1",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [cs], "_node": node}


def running(node: str = "node-1") -> Obj:
    return {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"},
                                               {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "worker", "ready": True, "restartCount": 0,
                                   "image": "x", "imageID": "",
                                   "state": {"running": {"startedAt": now()}}}],
            "_node": node}


def terminated(exit_code: int, reason: str, message: str = "", node: str = "node-1") -> Obj:
    term = {"exitCode": exit_code, "reason": reason, "startedAt": now(), "finishedAt": now()}
    if message:
        term["message"] = message
    return {"phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "ready": False, "restartCount": 0,
                                   "image": "x", "imageID": "", "state": {"terminated": term}}],
            "_node": node}


class FakeCluster:
    """The stand-in's state and controllers; `url` once `serve()` runs."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or secrets.token_hex(16)
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (resource, ns, name) -> obj
        self.requests: list[Request] = []
        self.rules: set[tuple[str, str]] | None = None  # allowed (verb, resource); None: all
        self.max_pods: int | None = None  # a pod quota in every namespace
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.previous_logs: dict[str, str] = {}
        self.graceful = False  # deleted pods linger with a deletionTimestamp (a kubelet ends them)
        self.lock = threading.RLock()
        self._rv = 0
        self.url = ""

    # -- objects ---------------------------------------------------------------------------

    def _stamp(self, obj: Obj) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        return obj

    def items(self, resource: str, ns: str | None = None) -> list[Obj]:
        with self.lock:
            return [copy.deepcopy(o) for (r, n, _), o in sorted(self.objects.items())
                    if r == resource and (ns is None or n == ns)]

    def get(self, resource: str, ns: str, name: str) -> Obj | None:
        with self.lock:
            obj = self.objects.get((resource, ns, name))
            return copy.deepcopy(obj) if obj else None

    def set_status(self, pod: str, status: Obj, ns: str = "default") -> None:
        """What a scheduler or kubelet would write; `_node` sets spec.nodeName."""
        with self.lock:
            obj = self.objects[("pods", ns, pod)]
            status = copy.deepcopy(status)
            node = status.pop("_node", None)
            if node:
                obj["spec"]["nodeName"] = node
            obj["status"] = status
            self._stamp(obj)
            self._reconcile_all()

    def _add(self, resource: str, ns: str, obj: Obj) -> Obj:
        group = next(g for g, r in KINDS if r == resource.split("/")[-1])
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now())
        obj["kind"] = KINDS[(group, resource.split("/")[-1])]
        obj["apiVersion"] = _VERSIONS[group]
        self.objects[(resource.split("/")[-1], ns, meta["name"])] = obj
        return self._stamp(obj)

    def _event(self, ns: str, owner: Obj, message: str) -> None:
        name = f"{owner['metadata']['name']}.{secrets.token_hex(8)}"
        self._add("events", ns, {
            "metadata": {"name": name},
            "involvedObject": {"kind": owner["kind"], "name": owner["metadata"]["name"],
                               "namespace": ns, "uid": owner["metadata"]["uid"]},
            "reason": "FailedCreate", "message": message, "type": "Warning",
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
            "source": {"component": "job-controller" if owner["kind"] == "Job"
                       else "replicaset-controller"}})

    # -- controllers -----------------------------------------------------------------------

    def _owned(self, owner: Obj, resource: str = "pods") -> list[Obj]:
        uid = owner["metadata"]["uid"]
        return [o for (r, _, _), o in sorted(self.objects.items()) if r == resource
                and any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences", []))]

    def _new_pod(self, ns: str, owner: Obj, template: Obj, extra: dict[str, str]) -> Obj | None:
        name = f"{owner['metadata']['name']}-{secrets.token_hex(3)[:5]}"
        pods_now = sum(1 for (r, n, _) in self.objects if r == "pods" and n == ns)
        if self.max_pods is not None and pods_now >= self.max_pods:
            self._event(ns, owner, f'Error creating: pods "{name}" is forbidden: exceeded quota:'
                        f" compute, requested: pods=1, used: pods={pods_now},"
                        f" limited: pods={self.max_pods}")
            return None
        meta = copy.deepcopy(template.get("metadata", {}))
        meta["name"] = name
        meta["labels"] = {**meta.get("labels", {}), **extra}
        meta["ownerReferences"] = [{
            "apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]
        return self._add("pods", ns, {"metadata": meta, "spec": copy.deepcopy(template["spec"]),
                                      "status": {"phase": "Pending", "qosClass": "Burstable"}})

    def _delete_pods(self, pods: list[Obj]) -> None:
        for p in pods:
            self._delete("pods", p["metadata"]["namespace"], p["metadata"]["name"], "Background")

    def _reconcile_job(self, job: Obj) -> None:
        ns, spec = job["metadata"]["namespace"], job["spec"]
        status = job.setdefault("status", {})
        pods = self._owned(job)
        conditions = status.setdefault("conditions", [])
        live = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        if any(c["status"] == "True" for c in conditions):
            return
        if spec.get("suspend"):
            self._delete_pods([p for p in live if not p["metadata"].get("deletionTimestamp")])
            return
        failed = [p for p in pods if p["status"].get("phase") == "Failed"]
        succeeded = [p for p in pods if p["status"].get("phase") == "Succeeded"]
        status.update(active=len(live), failed=len(failed), succeeded=len(succeeded))
        if len(failed) > spec.get("backoffLimit", 6):
            conditions.append({"type": "Failed", "status": "True",
                               "reason": "BackoffLimitExceeded"})
            self._delete_pods(live)
            return
        if succeeded:
            if not live:
                conditions.append({"type": "Complete", "status": "True"})
            return
        counted = live if spec.get("podReplacementPolicy") == "Failed" else [
            p for p in live if not p["metadata"].get("deletionTimestamp")]
        need = spec.get("parallelism", 1) - len(counted)
        extra = {"batch.kubernetes.io/job-name": job["metadata"]["name"],
                 "controller-uid": job["metadata"]["uid"]}
        for _ in range(max(0, need)):
            if self._new_pod(ns, job, spec["template"], extra) is None:
                break
        if need < 0:
            self._delete_pods(_ranked(counted)[:-need])

    def _reconcile_deployment(self, deployment: Obj) -> None:
        ns = deployment["metadata"]["namespace"]
        sets = self._owned(deployment, "replicasets")
        if not sets:
            rs = self._add("replicasets", ns, {
                "metadata": {"name": f"{deployment['metadata']['name']}-{secrets.token_hex(5)}",
                             "labels": deployment["spec"]["template"]["metadata"]["labels"],
                             "ownerReferences": [{
                                 "apiVersion": "apps/v1", "kind": "Deployment",
                                 "name": deployment["metadata"]["name"],
                                 "uid": deployment["metadata"]["uid"], "controller": True}]},
                "spec": {"template": deployment["spec"]["template"]}})
            sets = [rs]
        rs = sets[0]
        pods = [p for p in self._owned(rs) if not p["metadata"].get("deletionTimestamp")]
        live = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        need = deployment["spec"].get("replicas", 1) - len(live)
        refused = None
        for _ in range(max(0, need)):
            if self._new_pod(ns, rs, rs["spec"]["template"],
                             {"pod-template-hash": rs["metadata"]["name"].rsplit("-", 1)[1]}) is None:
                refused = "pods are forbidden: exceeded quota: compute"
                break
        if need < 0:
            self._delete_pods(_ranked(live)[:-need])
        conditions = [] if refused is None else [{"type": "ReplicaFailure", "status": "True",
                                                  "reason": "FailedCreate", "message": refused}]
        deployment["status"] = {"replicas": len(self._owned(rs)), "conditions": conditions}

    def _reconcile_all(self) -> None:
        for key, obj in list(self.objects.items()):
            if self.objects.get(key) is not obj:
                continue  # deleted meanwhile
            if key[0] == "jobs":
                self._reconcile_job(obj)
            elif key[0] == "deployments":
                self._reconcile_deployment(obj)

    def _delete(self, resource: str, ns: str, name: str, propagation: str) -> Obj:
        obj = self.objects.get((resource, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
        if resource == "pods" and self.graceful and obj["spec"].get("nodeName"):
            obj["metadata"].setdefault("deletionTimestamp", now())
            obj["metadata"]["deletionGracePeriodSeconds"] = obj["spec"].get(
                "terminationGracePeriodSeconds", 30)
            return self._stamp(obj)
        del self.objects[(resource, ns, name)]
        uid = obj["metadata"]["uid"]
        for (r, n, other), dependent in list(self.objects.items()):
            refs = dependent["metadata"].get("ownerReferences", [])
            if any(ref.get("uid") == uid for ref in refs):
                if propagation == "Orphan":
                    dependent["metadata"]["ownerReferences"] = [
                        ref for ref in refs if ref.get("uid") != uid]
                elif (r, n, other) in self.objects:
                    self._delete(r, n, other, "Background")
        return obj

    def remove_pod(self, ns: str, name: str) -> None:
        """What a kubelet does once a deleted pod's containers have stopped."""
        with self.lock:
            if ("pods", ns, name) in self.objects:
                graceful, self.graceful = self.graceful, False
                try:
                    self._delete("pods", ns, name, "Background")
                finally:
                    self.graceful = graceful
                self._reconcile_all()

    # -- requests ----------------------------------------------------------------------------

    def handle(self, method: str, url: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        parsed = urlparse(url)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        if headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if parsed.path == "/version":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-standin"}
        m = re.fullmatch(r"/(?:api/v1|apis/(batch|apps)/v1)/namespaces/([^/]+)/([a-z]+)"
                         r"(?:/([^/]+))?(?:/([a-z]+))?", parsed.path)
        if not m or (m.group(1) or "", m.group(3)) not in KINDS:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource"
                                            f" ({parsed.path})")
        group, ns, resource, name, sub = m.group(1) or "", *m.group(2, 3, 4, 5)
        body = json.loads(raw) if raw else None
        verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch",
                "PUT": "update", "DELETE": "delete" if name else "deletecollection"}[method]
        full = f"{resource}/{sub}" if sub else resource
        self.requests.append(Request(method, parsed.path, query, body, verb,
                                     f"{group}/{full}" if group else full,
                                     headers.get("content-type", "")))
        if self.rules is not None and (verb, f"{group}/{full}" if group else full) not in self.rules:
            raise ApiError(403, "Forbidden",
                           f'{full} is forbidden: User "system:serviceaccount:{ns}:jobfleet"'
                           f' cannot {verb} resource "{full}" in API group "{group}" in the'
                           f' namespace "{ns}"')
        with self.lock:
            return self._serve(method, group, ns, resource, name, sub, query, body, headers)

    def _serve(self, method: str, group: str, ns: str, resource: str, name: str | None,
               sub: str | None, query: dict[str, str], body: Any,
               headers: dict[str, str]) -> tuple[int, Any]:
        kind = KINDS[(group, resource)]
        key = (resource, ns, name or "")
        if method == "GET" and name is None:
            items = [o for o in self.items(resource, ns)
                     if label_match(query.get("labelSelector", ""),
                                    o["metadata"].get("labels") or {})
                     and field_match(query.get("fieldSelector", ""), o)]
            return 200, {"kind": f"{kind}List", "apiVersion": _VERSIONS[group],
                         "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        if method == "POST" and name is None:
            obj = copy.deepcopy(body)
            obj.setdefault("metadata", {}).setdefault("namespace", ns)
            _validate(kind, obj)
            if (resource, ns, obj["metadata"]["name"]) in self.objects:
                raise ApiError(409, "AlreadyExists",
                               f'{resource} "{obj["metadata"]["name"]}" already exists')
            obj.pop("status", None)
            created = self._add(resource, ns, obj)
            self._reconcile_all()
            return 201, self.objects.get((resource, ns, obj["metadata"]["name"]), created)
        if key not in self.objects:
            raise ApiError(404, "NotFound", f'{resource}{"." + group if group else ""}'
                                            f' "{name}" not found')
        obj = self.objects[key]
        if method == "GET" and sub == "log":
            logs = self.previous_logs if query.get("previous", "").lower() == "true" else self.logs
            if name not in logs:
                raise ApiError(400, "BadRequest", f'container "worker" in pod "{name}" is'
                                                  " waiting to start: ContainerCreating")
            lines = logs[str(name)].splitlines()[-int(query.get("tailLines", "100000")):]
            return 200, "".join(line + "\n" for line in lines)
        if method == "GET":
            return 200, obj
        if method == "PATCH":
            if "merge-patch" not in headers.get("content-type", "") and not isinstance(body, dict):
                raise ApiError(415, "UnsupportedMediaType", "only merge patches here")
            patched = _merge(obj, body)
            if kind == "Secret" and obj.get("immutable") and patched.get("data") != obj.get("data"):
                raise ApiError(422, "Invalid", f'Secret "{name}" is invalid: data: Forbidden:'
                                               " field is immutable when `immutable` is set")
            _validate(kind, patched)
            self.objects[key] = self._stamp(patched)
            self._reconcile_all()
            return 200, self.objects.get(key, patched)
        if method == "DELETE":
            options = body or {}
            propagation = (query.get("propagationPolicy") or options.get("propagationPolicy")
                           or ("Orphan" if kind == "Job" else "Background"))
            deleted = self._delete(resource, ns, str(name), propagation)
            self._reconcile_all()
            return 200, deleted
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    @contextmanager
    def serve(self) -> Iterator[FakeCluster]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    code, answer = cluster.handle(
                        self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                        raw)
                except ApiError as e:
                    code, answer = e.code, e.status()
                text = answer if isinstance(answer, str) else json.dumps(answer)
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(answer, str)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()

    def kubeconfig(self, path: Path, context: str = "standin") -> Path:
        """A kubeconfig whose `context` reaches this server with its token."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}},
                         {"name": "elsewhere", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "jobfleet", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "standin", "user": "jobfleet"}},
                         {"name": "elsewhere", "context": {"cluster": "elsewhere",
                                                           "user": "jobfleet"}}]}))
        return path


def _ranked(pods: list[Obj]) -> list[Obj]:
    """Pods in the order a controller removes them: unscheduled, pending, lower deletion
    cost, newer first."""
    def key(p: Obj) -> tuple[int, int, int, int]:
        cost = int(p["metadata"].get("annotations", {}).get(
            "controller.kubernetes.io/pod-deletion-cost", "0"))
        return (1 if p["spec"].get("nodeName") else 0,
                1 if p["status"].get("phase") == "Running" else 0, cost,
                -int(p["metadata"]["resourceVersion"]))
    return sorted(pods, key=key)


def _validate(kind: str, obj: Obj) -> None:
    """A few of the API server's own checks, enough to catch a manifest it would refuse."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    where = f'{kind} "{name}" is invalid'
    if not _NAME.match(name) or len(name) > (63 if kind in ("Job", "Deployment") else 253):
        raise ApiError(422, "Invalid", f"{where}: metadata.name: Invalid value: {name!r}")
    for k, v in (meta.get("labels") or {}).items():
        if not isinstance(v, str) or not _LABEL_VALUE.match(v):
            raise ApiError(422, "Invalid", f"{where}: metadata.labels: Invalid value: {k}={v!r}")
    if kind == "Secret":
        for k, v in (obj.get("data") or {}).items():
            try:
                base64.b64decode(v, validate=True)
            except ValueError:
                raise ApiError(422, "Invalid", f"{where}: data[{k}]: not base64") from None
    if kind in ("Job", "Deployment"):
        template = obj["spec"]["template"]
        pod = template["spec"]
        if not pod.get("containers") or not all(c.get("name") and c.get("image")
                                                for c in pod["containers"]):
            raise ApiError(422, "Invalid", f"{where}: spec.template.spec.containers: Required")
        allowed = ("Never", "OnFailure") if kind == "Job" else ("Always",)
        if pod.get("restartPolicy") not in allowed:
            raise ApiError(422, "Invalid", f"{where}: spec.template.spec.restartPolicy:"
                                           f" Unsupported value: {pod.get('restartPolicy')!r}")
        if kind == "Deployment":
            match = obj["spec"].get("selector", {}).get("matchLabels", {})
            labels = template.get("metadata", {}).get("labels", {})
            if not match or any(labels.get(k) != v for k, v in match.items()):
                raise ApiError(422, "Invalid", f"{where}: spec.template.metadata.labels:"
                                               " `selector` does not match template `labels`")


class LocalKubelet:
    """Runs the stand-in's pods as local processes: schedules each pending pod on
    `standin-node`, gives its container the environment the pod spec says (values, the pod's
    name from the downward API, every key of the Secret in `envFrom`) and nothing of this
    process's own but PATH and HOME, expands $(VAR) in its arguments, reports its phase and
    log, and stops it on deletion: SIGTERM, then SIGKILL after the pod's grace period."""

    def __init__(self, cluster: FakeCluster, ns: str = "default") -> None:
        self.cluster, self.ns = cluster, ns
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, float | None]] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="jobfleet-kubelet-"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> LocalKubelet:
        self.cluster.graceful = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for pod in self.cluster.items("pods", self.ns):
                self._sync(pod)

    def _env(self, pod: Obj, container: Obj) -> dict[str, str] | None:
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               "HOME": os.environ.get("HOME", "/root")}
        for source in container.get("envFrom", []):
            ref = source["secretRef"]["name"]
            secret = self.cluster.get("secrets", self.ns, ref)
            if secret is None:
                return None
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = pod["metadata"]["name"]
        return env

    def _sync(self, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        phase = pod["status"].get("phase")
        if pod["metadata"].get("deletionTimestamp"):
            self._stopping(pod)
            return
        if name not in self.procs and phase == "Pending":
            self._start(pod)
        elif name in self.procs:
            proc, log, _ = self.procs[name]
            code = proc.poll()
            if code is not None and phase not in ("Succeeded", "Failed"):
                self.cluster.logs[name] = log.read_text(errors="replace")
                self.cluster.set_status(name, terminated(
                    code, "Completed" if code == 0 else "Error", node="standin-node"), self.ns)

    def _start(self, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        env = self._env(pod, container)
        if env is None:
            self.cluster.set_status(name, waiting(
                "CreateContainerConfigError", "secret not found", node="standin-node"), self.ns)
            return
        args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                       a) for a in container.get("command", []) + container.get("args", [])]
        args[0] = shutil.which(args[0], path=env["PATH"]) or args[0]
        work = self.dir / name
        work.mkdir()
        log = work / "log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, cwd=work, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = (proc, log, None)
        self.cluster.set_status(name, running("standin-node"), self.ns)

    def _stopping(self, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        if name not in self.procs:
            self.cluster.remove_pod(self.ns, name)
            return
        proc, log, killed_at = self.procs[name]
        if proc.poll() is not None:
            self.cluster.logs[name] = log.read_text(errors="replace")
            self.cluster.remove_pod(self.ns, name)
            return
        if killed_at is None:
            os.killpg(proc.pid, signal.SIGTERM)
            self.procs[name] = (proc, log, time.monotonic())
        elif time.monotonic() - killed_at > float(pod["metadata"].get(
                "deletionGracePeriodSeconds", 30)):
            os.killpg(proc.pid, signal.SIGKILL)
