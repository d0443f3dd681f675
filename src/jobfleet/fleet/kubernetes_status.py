"""How the kubernetes provider reads what it finds, as pure functions on the API's JSON: a pod
becomes a Machine with its phase and the reason Kubernetes gives (the scheduler's own
message, an image that will not pull, a crash, an eviction), and a Job or Deployment whose
pods are not there yet becomes the workers it still means to start (with the error that
keeps it from creating them, such as an exceeded quota)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jobfleet.fleet.base import BOOTSTRAPPING, FAILED, LAUNCHING, READY, STOPPED, Machine
from jobfleet.fleet.kubernetes_manifests import ANY_RUN, CONTAINER, RUN_LABEL, WORKER_LABEL

PROVIDER = "kubernetes"
#: container waiting reasons that mean the worker will not start without a change
FAILED_WAITS = frozenset({
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff",
    "RunContainerError", "ImageInspectError", "PreStartHookError", "PostStartHookError"})
#: where a failed pod's log is: the container's own, or the run before its restart
CURRENT, PREVIOUS = "current", "previous"

Obj = Mapping[str, Any]


def _labels(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def run_of(obj: Obj) -> str | None:
    run = _labels(obj).get(RUN_LABEL)
    return None if run in (None, ANY_RUN) else run


def group_of(obj: Obj) -> str | None:
    """The launch (Job or Deployment name) an object belongs to."""
    return _labels(obj).get(WORKER_LABEL)


def alive(pod: Obj) -> bool:
    """Is the pod (about to be) a working worker: not finished, not being deleted?"""
    return (not pod.get("metadata", {}).get("deletionTimestamp")
            and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"))


def _container(pod: Obj) -> Obj:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == CONTAINER:
            return dict(cs)
    return dict(statuses[0]) if statuses else {}


def _condition(obj: Obj, kind: str) -> Obj | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def ended(term: Obj) -> str:
    """`OOMKilled (exit status 137)`, `exited with status 3: message`."""
    code, reason = term.get("exitCode"), term.get("reason") or ""
    if reason and reason not in ("Error", "Completed"):
        text = f"{reason} (exit status {code})" if code is not None else reason
    elif term.get("signal"):
        text = f"killed by signal {term['signal']}"
    else:
        text = f"exited with status {code}"
    message = " ".join(str(term.get("message") or "").split())
    return f"{text}: {message}" if message else text


def pod_machine(pod: Obj, fleet: str) -> tuple[Machine, str | None]:
    """The Machine a pod is, and which of its logs tells why it failed (CURRENT, PREVIOUS or
    None: no log to read)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    name = meta["name"]

    def machine(phase: str, reason: str | None = None) -> Machine:
        return Machine(name, PROVIDER, fleet, phase, name, spec.get("nodeName"), run_of(pod),
                       reason=reason)

    phase = status.get("phase") or "Pending"
    cs = _container(pod)
    state, last = cs.get("state") or {}, cs.get("lastState") or {}
    if meta.get("deletionTimestamp"):
        grace = spec.get("terminationGracePeriodSeconds")
        return machine(STOPPED, "stopping: deleted, its worker drains its jobs"
                       + (f" (for up to {grace} s)" if grace else "")), None
    if phase == "Succeeded":
        return machine(STOPPED, "its worker exited"), None
    if phase == "Failed":
        if state.get("terminated"):
            return machine(FAILED, ended(state["terminated"])), CURRENT
        why = status.get("reason") or "failed"  # Evicted, DeadlineExceeded, ...
        message = " ".join(str(status.get("message") or "").split())
        return machine(FAILED, f"{why}: {message}" if message else why), None
    if phase == "Unknown":
        return machine(FAILED, "its node stopped reporting (pod phase Unknown)"), None
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FAILED_WAITS:
        why = waiting["reason"]
        message = " ".join(str(waiting.get("message") or "").split())
        if message:
            why = f"{why}: {message}"
        if last.get("terminated"):
            why = f"{why} (last run: {ended(last['terminated'])})"
            return machine(FAILED, why), PREVIOUS
        return machine(FAILED, why), None
    if phase == "Running":
        if state.get("running"):
            return machine(READY), None
        return machine(BOOTSTRAPPING, waiting.get("reason")), None
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        # the scheduler's own words: "0/3 nodes are available: 3 Insufficient cpu."
        why = " ".join(str(scheduled.get("message") or "").split())
        return machine(LAUNCHING, why or scheduled.get("reason") or "not scheduled yet"), None
    if spec.get("nodeName") or (scheduled is not None and scheduled.get("status") == "True"):
        why = waiting.get("reason")
        return machine(BOOTSTRAPPING, None if why in (None, "ContainerCreating") else why), None
    return machine(LAUNCHING), None


def finished(job: Obj) -> bool:
    return any((c := _condition(job, kind)) is not None and c.get("status") == "True"
               for kind in ("Complete", "Failed"))


def wanted(kind: str, group: Obj, pods: Sequence[Obj]) -> int:
    """How many workers a Job or Deployment still means to have running."""
    spec = group.get("spec", {})
    if kind == "deployment":
        return int(spec.get("replicas") or 0)
    if finished(group):
        return 0
    if any(p.get("status", {}).get("phase") == "Succeeded" for p in pods):
        # a work queue Job starts no pod once one has succeeded
        return sum(alive(p) for p in pods)
    return int(spec.get("parallelism") or 0)


def group_machines(kind: str, group: Obj, pods: Sequence[Obj], fleet: str,
                   failure: str | None = None) -> list[Machine]:
    """The workers a Job or Deployment means to start but has no pod for yet (`GROUP/i`,
    launching, with `failure` or the Deployment's own ReplicaFailure as the reason), or the
    object itself when nothing of it is left (`job/NAME`, stopped) so teardown deletes it."""
    name = group["metadata"]["name"]
    want = wanted(kind, group, pods)
    missing = max(0, want - sum(alive(p) for p in pods))
    if missing:
        replica_failure = _condition(group, "ReplicaFailure")
        if failure is None and replica_failure and replica_failure.get("status") == "True":
            failure = replica_failure.get("message")
        owner = "Job" if kind == "job" else "Deployment's ReplicaSet"
        why = failure or f"waiting for the {owner} to create its pod"
        return [Machine(f"{name}/{i}", PROVIDER, fleet, LAUNCHING, run_id=run_of(group),
                        reason=why) for i in range(missing)]
    if not pods and want == 0:
        return [Machine(f"{kind}/{name}", PROVIDER, fleet, STOPPED, run_id=run_of(group),
                        reason=f"an empty {kind}: `jobfleet fleet down` deletes it")]
    return []


def latest_failures(events: Sequence[Obj]) -> dict[str, str]:
    """Object name -> the message of its latest FailedCreate event ('Error creating: pods
    "..." is forbidden: exceeded quota: ...')."""
    found: dict[str, tuple[str, str]] = {}
    for e in events:
        if e.get("reason") != "FailedCreate":
            continue
        name = (e.get("involvedObject") or {}).get("name")
        when = str(e.get("lastTimestamp") or e.get("eventTime")
                   or e.get("metadata", {}).get("creationTimestamp") or "")
        if name and (name not in found or when >= found[name][0]):
            found[name] = (when, " ".join(str(e.get("message") or "").split()))
    return {name: message for name, (_, message) in found.items()}


def failure_for(group: str, failures: Mapping[str, str]) -> str | None:
    """The FailedCreate message of a group: its Job's, or its Deployment's ReplicaSet's."""
    if group in failures:
        return failures[group]
    for name, message in failures.items():
        if name.startswith(group + "-"):
            return message
    return None


def broken(by_group: Mapping[str, Sequence[Machine]]) -> dict[str, str]:
    """Groups whose every worker failed -> the last one's reason."""
    return {group: str(ms[-1].reason) for group, ms in by_group.items()
            if group and ms and all(m.phase == FAILED for m in ms)}
