"""The kubernetes provider: its manifests checked against the official client's models, its
settings refused before any API call, and its real client calls (create, list by label
selector, phase mapping, logs, scale down, delete) made against a stand-in API server.

The limit, written down: no real Kubernetes API server runs on this machine. There is no
container engine (so no kind, k3d or minikube), Debian bookworm packages etcd but not
kube-apiserver, no package on PyPI ships one, and building it from source is out of reach of
a test. So the API server here is tests/kube_api.py, a stand-in on 127.0.0.1 that speaks
enough of the REST API for these calls, with stand-ins for the Job, ReplicaSet and garbage
collection controllers, and, for the end-to-end test, a "kubelet" that runs each pod's
command as a local process with the environment its Secret gives it. What it cannot show:
that a real API server accepts every field (the models check names and types, the stand-in
a few of the server's own rules), real scheduling, and real image pulls. docs/providers/
kubernetes.md says the same.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Jobfleet, wait_for, write_csv
from jobfleet.errors import ConfigError
from jobfleet.fleet import FAILED, LAUNCHING, LIVE, READY, STOPPED, LaunchSpec, provider_named
from jobfleet.fleet.autoscale import down
from kube_api import FakeCluster, LocalKubelet, running, terminated, unschedulable, waiting

try:
    import kubernetes
except ImportError:  # in CI the dev extra installs it: a missing client is a failure there
    if os.environ.get("CI"):
        raise
    pytest.skip("the kubernetes client is not installed (pip install -e '.[dev]')",
                allow_module_level=True)
from jobfleet.fleet.kubernetes import KubernetesError, KubernetesProvider  # noqa: E402
from jobfleet.fleet.kubernetes_manifests import (  # noqa: E402
    deployment_manifest,
    job_manifest,
    parse_quantity,
    parse_settings,
    secret_manifest,
)

DOCS = Path(__file__).parent.parent / "docs" / "providers" / "kubernetes.md"
PASSWORD = "s3cr3t-pw-" + secrets.token_hex(4)
STORE = f"postgresql://jobfleet:{PASSWORD}@db.internal:5432/jobs"
ENV = {"JOBFLEET_STORE": STORE, "JOBFLEET_BLOBS": "s3://bucket/jobfleet",
       "AWS_SECRET_ACCESS_KEY": "aws-" + PASSWORD}
SPEC = LaunchSpec(fleet="kf", run_id="3f9a2c1b", slots=2, idle_exit=30.0, env=ENV,
                  version="0.1.0")
UNSCHEDULABLE = ("0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are"
                 " available: 3 No preemption victims found for incoming pod.")
FULL = {
    "image": "registry.example/jobfleet:0.1.0",
    "namespace": "batch",
    "cpu": "2",
    "memory": "4Gi",
    "gpus": 1,
    "node_selector": {"disktype": "ssd", "cloud.example/pool": "spot"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "topology.kubernetes.io/zone", "operator": "In",
             "values": ["eu-west-1a", "eu-west-1b"]}]}]}}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "spot", "operator": "Equal", "value": "true",
                     "effect": "NoExecute", "tolerationSeconds": 60}],
    "service_account": "jobfleet-worker",
    "image_pull_secrets": ["regcred", "mirror-cred"],
    "drain_seconds": "2m",
}


# --- the official client's models ------------------------------------------------------------


def to_model(obj: dict[str, Any], klass: str) -> Any:
    """`obj` (JSON) as the client makes it of an API server's answer."""
    api = kubernetes.client.ApiClient()
    text = json.dumps(obj)
    if "response_text" in inspect.signature(api.deserialize).parameters:  # client >= 37
        return api.deserialize(text, klass, "application/json")

    class Answer:  # what the client's REST layer hands deserialize
        data = text

    return api.deserialize(Answer(), klass)


def round_trip(obj: dict[str, Any], klass: str) -> Any:
    """The model of `obj`; every field of `obj` survives it (a field the model does not know
    would be dropped)."""
    model = to_model(obj, klass)
    assert kubernetes.client.ApiClient().sanitize_for_serialization(model) == obj
    return model


@pytest.mark.parametrize("kind", ["job", "deployment"])
def test_manifests_match_the_official_models_field_by_field(kind: str) -> None:
    s = parse_settings({**FULL, "kind": kind})
    group = "jobfleet-kf-abc123"
    if kind == "job":
        manifest = job_manifest(s, SPEC, group, 3)
        top = round_trip(manifest, "V1Job")
        assert (top.spec.parallelism, top.spec.suspend, top.spec.backoff_limit) == (3, True, 3)
        assert top.spec.pod_replacement_policy == "Failed"
        assert top.spec.completions is None  # a work queue: idle workers just exit
        assert top.spec.ttl_seconds_after_finished == 3600
        rule = top.spec.pod_failure_policy.rules[0]
        assert (rule.action, rule.on_pod_conditions[0].type) == ("Ignore", "DisruptionTarget")
        pod = top.spec.template.spec
        assert pod.restart_policy == "Never"
    else:
        manifest = deployment_manifest(s, SPEC, group)
        top = round_trip(manifest, "V1Deployment")
        assert top.spec.replicas == 0 and top.spec.strategy.type == "Recreate"
        assert top.spec.selector.match_labels == {"jobfleet.io/fleet": "kf",
                                                  "jobfleet.io/worker": group}
        pod = top.spec.template.spec
        assert pod.restart_policy == "Always"
    labels = {"jobfleet.io/fleet": "kf", "jobfleet.io/run": "3f9a2c1b",
              "jobfleet.io/worker": group, "app.kubernetes.io/managed-by": "jobfleet"}
    assert top.metadata.labels == labels and top.metadata.namespace == "batch"
    assert top.spec.template.metadata.labels == labels
    assert top.metadata.name == group
    c = pod.containers[0]
    assert c.image == "registry.example/jobfleet:0.1.0"
    assert c.command == ["jobfleet", "worker"]
    args = c.args
    assert args[args.index("--id") + 1] == "$(POD_NAME)"
    assert args[args.index("--run") + 1] == "3f9a2c1b"
    assert args[args.index("--cpus") + 1] == "2"
    assert args[args.index("--memory") + 1] == str(4 * 2**30)
    assert args[args.index("--gpus") + 1] == "1"
    assert args[args.index("--idle-exit") + 1] == ("30" if kind == "job" else "inf")
    assert c.resources.requests == {"cpu": "2", "memory": "4Gi"}
    assert c.resources.limits == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert pod.termination_grace_period_seconds == 120 + 15
    assert pod.node_selector == {"disktype": "ssd", "cloud.example/pool": "spot"}
    term = pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    expr = term.node_selector_terms[0].match_expressions[0]
    assert (expr.key, expr.operator, expr.values) == ("topology.kubernetes.io/zone", "In",
                                                      ["eu-west-1a", "eu-west-1b"])
    assert [(t.key, t.operator, t.value, t.effect, t.toleration_seconds)
            for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", None, "NoSchedule", None),
                                          ("spot", "Equal", "true", "NoExecute", 60)]
    assert pod.service_account_name == "jobfleet-worker"
    assert pod.automount_service_account_token is None
    assert [r.name for r in pod.image_pull_secrets] == ["regcred", "mirror-cred"]
    # the store reaches the worker only through the Secret
    assert [e.secret_ref.name for e in c.env_from] == [f"{group}-env"]
    assert {e.name: e.value for e in c.env} == {"POD_NAME": None, "JOBFLEET_DRAIN_SECONDS": "120"}
    assert c.env[0].value_from.field_ref.field_path == "metadata.name"
    text = json.dumps(manifest)
    for secret in (PASSWORD, STORE, "s3://bucket", *(
            base64.b64encode(v.encode()).decode() for v in ENV.values())):
        assert secret not in text


def test_a_minimal_manifest_has_no_resources_and_no_token() -> None:
    s = parse_settings({"image": "jobfleet:0.1.0"})
    assert (s.namespace, s.kind, s.drain_seconds) == ("default", "job", 60.0)
    job = round_trip(job_manifest(s, SPEC, "jobfleet-kf-000001", 1), "V1Job")
    pod = job.spec.template.spec
    assert pod.containers[0].resources is None  # nothing asked: the namespace's defaults
    assert pod.automount_service_account_token is False  # workers need no API access
    assert pod.service_account_name is None and pod.image_pull_secrets is None
    assert pod.node_selector is None and pod.affinity is None and pod.tolerations is None


def test_the_secret_holds_the_environment_and_is_owned() -> None:
    s = parse_settings(FULL)
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "jobfleet-kf-abc123",
             "uid": "0f3c-uid"}
    secret = round_trip(secret_manifest(s, SPEC, "jobfleet-kf-abc123", owner, ENV), "V1Secret")
    assert secret.metadata.name == "jobfleet-kf-abc123-env"
    assert secret.metadata.labels["jobfleet.io/worker"] == "jobfleet-kf-abc123"
    assert secret.metadata.labels["jobfleet.io/fleet"] == "kf"
    assert secret.immutable is True and secret.type == "Opaque"
    ref = secret.metadata.owner_references[0]
    assert (ref.kind, ref.name, ref.uid) == ("Job", "jobfleet-kf-abc123", "0f3c-uid")
    assert {k: base64.b64decode(v).decode() for k, v in secret.data.items()} == ENV


def test_quantities() -> None:
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("4Gi") == 4 * 2**30
    assert parse_quantity("1e9") == parse_quantity("1G") == 10**9
    assert parse_quantity("1.5Ki") == 1536
    for bad in ("lots", "2 Gi", "1GB", "", "1e99999", "Gi"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


BAD = [
    ({"memory": "lots"}, "memory = 'lots'"),
    ({"kind": "cronjob"}, "kind = 'cronjob'"),
    ({"memory": "512m"}, "512Mi"),
    ({"cpu": "0"}, "at least 1m"),
    ({"image": ""}, "image is not set"),
    ({"gpus": -1}, "gpus"),
    ({"namespace": "Batch_Jobs"}, "namespace"),
    ({"node_selector": {"pool": {"nested": 1}}}, "node_selector"),
    ({"affinity": {"nodeAfinity": {}}}, "affinity.nodeAfinity is not a field"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpresions": []}]}}}}, "matchExpresions"),
    ({"tolerations": [{"key": "gpu", "operator": "Maybe"}]}, "operator"),
    ({"tolerations": [{"key": "gpu", "tolerationSeconds": "60"}]}, "whole number"),
    ({"image_pull_secrets": ["Not A Name"]}, "image_pull_secrets"),
    ({"replicas": 3}, "no setting 'replicas'"),
]


@pytest.mark.parametrize(("bad", "said"), BAD)
def test_bad_settings_are_refused_before_any_api_call(cluster: FakeCluster, tmp_path: Path,
                                                      bad: dict[str, Any], said: str) -> None:
    settings = {"image": "jobfleet:0.1.0", **connection(cluster, tmp_path), **bad}
    with pytest.raises(ConfigError) as e:
        provider_named("kubernetes", "kf", settings)
    assert said in str(e.value)
    assert cluster.requests == []


# --- against the stand-in API server ---------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    with FakeCluster().serve() as c:
        yield c


def connection(cluster: FakeCluster, tmp_path: Path) -> dict[str, str]:
    """Settings that reach the stand-in: its kubeconfig, whose current context points
    elsewhere, so that `context` must be honoured."""
    return {"kubeconfig": str(cluster.kubeconfig(tmp_path / "kubeconfig")), "context": "standin"}


def role_rules(kind: str) -> set[tuple[str, str]]:
    """(verb, resource) pairs of the Role docs/providers/kubernetes.md gives for `kind`."""
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    for doc in (d for b in blocks for d in yaml.safe_load_all(b)):
        if not isinstance(doc, dict) or doc.get("kind") != "Role":
            continue
        rules = {(verb, f"{group}/{res}" if group else res)
                 for rule in doc["rules"] for group in rule["apiGroups"]
                 for res in rule["resources"] for verb in rule["verbs"]}
        if any(r == ("batch/jobs" if kind == "job" else "apps/deployments") for _, r in rules):
            return rules
    raise AssertionError(f"no Role for kind {kind} in {DOCS}")


def open_provider(cluster: FakeCluster, tmp_path: Path, **settings: Any) -> KubernetesProvider:
    p = provider_named("kubernetes", "kf", {"image": "jobfleet:0.1.0",
                                            **connection(cluster, tmp_path), **settings})
    assert isinstance(p, KubernetesProvider)
    return p


def pods_of(cluster: FakeCluster) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.items("pods")]


def nothing_left(cluster: FakeCluster) -> bool:
    return not any(cluster.items(r) for r in ("pods", "jobs", "deployments", "replicasets",
                                               "secrets"))


def test_job_workers_from_launch_to_teardown(cluster: FakeCluster, tmp_path: Path) -> None:
    cluster.rules = role_rules("job")  # the docs' least-privilege Role is enough
    p = open_provider(cluster, tmp_path, cpu="500m", memory="1Gi")
    launched = p.launch(4, SPEC)
    assert [m.phase for m in launched] == [LAUNCHING] * 4
    [job] = cluster.items("jobs")
    [secret] = cluster.items("secrets")
    group = job["metadata"]["name"]
    assert re.fullmatch(r"jobfleet-kf-[0-9a-f]{6}", group)
    # created held back, its Secret owned by it, then let go
    creates = [(r.method, r.resource) for r in cluster.requests if r.method != "GET"]
    assert creates == [("POST", "batch/jobs"), ("POST", "secrets"), ("PATCH", "batch/jobs")]
    assert cluster.requests[0].body["spec"]["suspend"] is True
    assert job["spec"]["suspend"] is False and job["spec"]["parallelism"] == 4
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == ENV
    for r in cluster.requests:
        if r.resource != "secrets":
            assert PASSWORD not in json.dumps(r.body)
    pods = pods_of(cluster)
    assert len(pods) == 4
    listed = p.list()
    assert sorted(m.id for m in listed) == sorted(pods)
    assert all(m.phase == LAUNCHING and m.worker_id == m.id and m.run_id == "3f9a2c1b"
               for m in listed)
    lists = [r for r in cluster.requests if r.verb == "list"]
    assert lists and all(r.query["labelSelector"] == "jobfleet.io/fleet=kf" for r in lists)

    # what the scheduler and kubelet say becomes each machine's phase and reason
    a, b, c, d = pods
    cluster.set_status(a, unschedulable(UNSCHEDULABLE))
    cluster.set_status(b, waiting("ImagePullBackOff",
                                  'Back-off pulling image "jobfleet:0.1.0"'))
    cluster.set_status(c, running("node-7"))
    cluster.set_status(d, waiting("CrashLoopBackOff", "back-off 40s restarting failed"
                                  " container=worker", restarts=3, last_exit=98))
    cluster.previous_logs[d] = "jobfleet: starting\njobfleet: error: store unreachable\n"
    by_id = {m.id: m for m in p.list()}
    assert (by_id[a].phase, by_id[a].reason) == (LAUNCHING, UNSCHEDULABLE)
    assert by_id[b].phase == FAILED
    assert by_id[b].reason == 'ImagePullBackOff: Back-off pulling image "jobfleet:0.1.0"'
    assert (by_id[c].phase, by_id[c].host) == (READY, "node-7")
    assert by_id[d].phase == FAILED and "CrashLoopBackOff" in str(by_id[d].reason)
    assert "exited with status 98" in str(by_id[d].reason)
    assert by_id[d].log_tail == ("jobfleet: starting", "jobfleet: error: store unreachable")
    cluster.set_status(d, terminated(137, "OOMKilled"))
    cluster.logs[d] = "\n".join(f"line {i}" for i in range(50))
    dead = {m.id: m for m in p.list()}[d]
    assert (dead.phase, dead.reason) == (FAILED, "OOMKilled (exit status 137)")
    assert dead.log_tail == tuple(f"line {i}" for i in range(30, 50))
    [replacement] = set(pods_of(cluster)) - set(pods)  # the Job replaces a failed worker
    assert {m.id: m.phase for m in p.list()}[replacement] == LAUNCHING

    # one worker stopped: its pod deleted, the Job asks for one fewer, nothing replaces it
    p.terminate([a])
    assert cluster.items("jobs")[0]["spec"]["parallelism"] == 3
    assert sorted(pods_of(cluster)) == sorted([b, c, d, replacement])
    assert sorted(m.id for m in p.list()) == sorted([b, c, d, replacement])

    # fleet down: nothing listed, the Job, its pods and the Secret gone
    assert down(p, wait=10) == []
    assert p.list() == []
    assert nothing_left(cluster)
    assert {(r.verb, r.resource) for r in cluster.requests} <= cluster.rules


def test_deployment_workers_scale_down_the_chosen_pod(cluster: FakeCluster,
                                                      tmp_path: Path) -> None:
    cluster.rules = role_rules("deployment")
    p = open_provider(cluster, tmp_path, kind="deployment", memory="512Mi")
    p.launch(3, SPEC)
    [deployment] = cluster.items("deployments")
    assert deployment["spec"]["replicas"] == 3
    pods = pods_of(cluster)
    for name in pods:
        cluster.set_status(name, running())
    assert [m.phase for m in p.list()] == [READY] * 3
    p.terminate([pods[1]])  # the autoscaler drains this idle one
    assert cluster.items("deployments")[0]["spec"]["replicas"] == 2
    assert sorted(pods_of(cluster)) == sorted([pods[0], pods[2]])
    p.launch(1, SPEC)  # a second launch is a second Deployment
    assert len(cluster.items("deployments")) == 2 and len(cluster.items("secrets")) == 2
    assert len(p.list()) == 3
    assert down(p, wait=10) == []
    assert p.list() == [] and nothing_left(cluster)
    assert {(r.verb, r.resource) for r in cluster.requests} <= cluster.rules


def test_a_quota_that_refuses_pods_is_the_reason(cluster: FakeCluster, tmp_path: Path) -> None:
    cluster.max_pods = 1
    p = open_provider(cluster, tmp_path)
    p.launch(3, SPEC)
    listed = p.list()
    assert len(pods_of(cluster)) == 1 and len(listed) == 3
    waiting_ones = [m for m in listed if m.id not in pods_of(cluster)]
    assert len(waiting_ones) == 2 and all(m.phase == LAUNCHING for m in waiting_ones)
    assert all("exceeded quota: compute" in str(m.reason) for m in waiting_ones)
    assert "is forbidden" in str(waiting_ones[0].reason)
    assert down(p, wait=10) == []
    assert p.list() == [] and nothing_left(cluster)


def test_the_autoscaler_gives_up_on_workers_that_all_fail(cluster: FakeCluster,
                                                          tmp_path: Path, jf: Jobfleet) -> None:
    """An image that does not pull fails every pod alike: after two such launches the
    provider starts no more, so the autoscaler stops with the reason instead of piling up
    Jobs."""
    from jobfleet.fleet.autoscale import Autoscaler, FleetError
    from jobfleet.spec import JobSpec
    from jobfleet.store import NewRun

    p = open_provider(cluster, tmp_path)
    with jf.open_store() as db:
        run_id = db.submit(NewRun(), [JobSpec("true")] * 4)
        spec = LaunchSpec("kf", run_id, env={"JOBFLEET_STORE": db.location})
        scaler = Autoscaler(db, p, spec, max_workers=2)

        def pull_fails() -> None:
            for name in pods_of(cluster):
                cluster.set_status(name, waiting("ImagePullBackOff",
                                                 'Back-off pulling image "jobfleet:0.1.0"'))

        assert scaler.step().launched == 2
        pull_fails()
        assert scaler.step().launched == 2  # a second try
        pull_fails()
        with pytest.raises(FleetError) as e:
            for _ in range(5):
                scaler.step()
        assert "not starting more pods" in e.value.message
        assert "ImagePullBackOff" in e.value.message
        assert len(cluster.items("jobs")) == 2
    assert down(p, wait=10) == [] and nothing_left(cluster)


def test_gateway_workers_get_the_server_and_token_not_the_store(cluster: FakeCluster,
                                                                 tmp_path: Path) -> None:
    p = open_provider(cluster, tmp_path)
    p.launch(1, LaunchSpec("kf", None, env=ENV, server="https://jobfleet.internal:8443",
                           token="wt-" + PASSWORD))
    [secret] = cluster.items("secrets")
    env = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert env["JOBFLEET_SERVER"] == "https://jobfleet.internal:8443"
    assert env["JOBFLEET_TOKEN"] == "wt-" + PASSWORD
    assert "JOBFLEET_STORE" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert PASSWORD not in json.dumps(cluster.items("jobs"))
    assert cluster.items("jobs")[0]["metadata"]["labels"]["jobfleet.io/run"] == "any"
    assert down(p, wait=10) == [] and nothing_left(cluster)


def test_no_cluster_to_talk_to_is_a_config_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError) as e:
        provider_named("kubernetes", "kf", {"image": "jobfleet:0.1.0"})
    assert "no cluster to talk to" in e.value.message and "kubeconfig" in str(e.value.hint)
    # in a pod without its service account's token
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ConfigError) as e:
        provider_named("kubernetes", "kf", {"image": "jobfleet:0.1.0"})
    assert "cannot load the cluster's settings" in e.value.message
    with pytest.raises(ConfigError) as e:  # a context the kubeconfig does not have
        provider_named("kubernetes", "kf", {"image": "jobfleet:0.1.0", "context": "nope",
                                            "kubeconfig": str(FakeCluster().kubeconfig(
                                                tmp_path / "kubeconfig"))})
    assert "context 'nope'" in e.value.message


def test_refusals_say_what_to_do(cluster: FakeCluster, tmp_path: Path) -> None:
    cluster.rules = set()  # an account with no Role
    p = open_provider(cluster, tmp_path)
    failed = p.launch(2, SPEC)
    assert [m.phase for m in failed] == [FAILED, FAILED]
    assert "forbidden" in str(failed[0].reason) and "HTTP 403" in str(failed[0].reason)
    with pytest.raises(KubernetesError) as e:
        p.list()
    assert "docs/providers/kubernetes.md" in str(e.value.hint)
    cluster.rules = None
    cluster.token = "another"  # the kubeconfig's token no longer works
    with pytest.raises(KubernetesError) as e:
        p.list()
    assert "HTTP 401" in e.value.message and "log in again" in str(e.value.hint)


def test_cli_status_shows_the_schedulers_reason_and_down_leaves_nothing(
        cluster: FakeCluster, tmp_path: Path, jf: Jobfleet) -> None:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    (tmp_path / "jobfleet.toml").write_text(
        '[fleet]\nprovider = "kubernetes"\nname = "kf"\n\n[providers.kubernetes]\n'
        f'image = "jobfleet:0.1.0"\nkubeconfig = "{kubeconfig}"\ncontext = "standin"\n'
        'cpu = "4"\n')
    up = jf("fleet", "up", "2", check=0)
    assert up.stdout.count(": launching") == 2
    pods = pods_of(cluster)
    assert len(pods) == 2
    cluster.set_status(pods[0], unschedulable("0/3 nodes are available: 3 Insufficient cpu."))
    status = jf("fleet", "status", check=0, env={"COLUMNS": "200"}).stdout
    assert "launching: 0/3 nodes are available: 3 Insufficient cpu." in " ".join(status.split())
    shown = jf.json("fleet", "status")
    assert {m["reason"] for m in shown["machines"]} == {
        "0/3 nodes are available: 3 Insufficient cpu.", None}
    assert str(jf.store_path) not in json.dumps(cluster.items("jobs"))
    gone = jf("fleet", "down", check=0)
    assert "nothing is left" in gone.stdout
    assert nothing_left(cluster)


def test_jobfleet_run_on_pods_run_by_a_local_kubelet(cluster: FakeCluster, tmp_path: Path,
                                                     jf: Jobfleet) -> None:
    """The whole path: `jobfleet run --provider kubernetes` launches a Job; the stand-in's
    kubelet runs its pods' command as given, with only the Secret's environment (so the
    store's location reaches the workers through envFrom and nothing else); the jobs finish,
    and teardown leaves nothing."""
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    (tmp_path / "jobfleet.toml").write_text(
        '[providers.kubernetes]\nimage = "jobfleet:0.1.0"\n'
        f'kubeconfig = "{kubeconfig}"\ncontext = "standin"\ndrain_seconds = 5\n')
    jobs = write_csv(tmp_path / "jobs.csv", ["command", "n"],
                     [["echo n={n}", i] for i in range(6)])
    with LocalKubelet(cluster):
        done = jf("run", str(jobs), "--provider", "kubernetes", "--fleet", "kf",
                  "--max-workers", "2", timeout=90, check=0)
        assert "nothing is left" in done.stdout
        wait_for(lambda: nothing_left(cluster), 15, what="the cluster to be empty")
    run = jf.json("runs")[0]["run"]
    jobs_done = jf.jobs(run).values()
    assert {j["state"] for j in jobs_done} == {"succeeded"}
    assert jf.log(run, 1) == "n=0\n"
    # each worker is its pod, named after it through the downward API
    assert all(re.fullmatch(r"jobfleet-kf-[0-9a-f]{6}-[0-9a-f]{5}", j["worker"])
               for j in jobs_done)
    assert any(r.method == "POST" and r.resource == "batch/jobs" for r in cluster.requests)


def test_phases_read_from_the_clients_own_pod_models() -> None:
    """The provider reads pods as the client returns them (models, made JSON again): a pod
    built with the official models maps to the same machine."""
    from jobfleet.fleet.kubernetes_status import pod_machine

    c = kubernetes.client
    pod = c.V1Pod(
        metadata=c.V1ObjectMeta(name="jobfleet-kf-abc123-x1y2z", labels={
            "jobfleet.io/fleet": "kf", "jobfleet.io/run": "any",
            "jobfleet.io/worker": "jobfleet-kf-abc123"}),
        spec=c.V1PodSpec(containers=[c.V1Container(name="worker", image="jobfleet")]),
        status=c.V1PodStatus(phase="Pending", conditions=[c.V1PodCondition(
            type="PodScheduled", status="False", reason="Unschedulable",
            message="0/2 nodes are available: 2 node(s) didn't match Pod's node"
                    " affinity/selector.")]))
    m, log = pod_machine(c.ApiClient().sanitize_for_serialization(pod), "kf")
    assert (m.phase, m.run_id, log) == (LAUNCHING, None, None)
    assert m.reason == ("0/2 nodes are available: 2 node(s) didn't match Pod's node"
                        " affinity/selector.")
    assert m.phase in LIVE and STOPPED not in LIVE
