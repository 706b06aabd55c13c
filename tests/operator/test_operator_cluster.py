"""The CRD and the operator against the real local control plane (simulated GPU nodes by kwok).

One operator process serves the whole module, watching all namespaces as the
chart runs it; each test works in its own namespace. The restart test stops and
starts that same process. Every wait polls with a deadline.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from forkless_operator.apply import FIELD_MANAGER
from forkless_operator.crd import CRD_FILENAME
from forkless_operator.render import render_children
from forkless_operator.spec import InferenceService
from forkless_operator.status_cache import DEFER_S
from test_operator_spec import INVALID_EXAMPLES  # tests/operator is on sys.path (rootdir-less test dirs)

from tests.conftest import beside_the_cluster, pinned_module_crds

if TYPE_CHECKING:
    from tests.conftest import Kube

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / CRD_FILENAME
EXAMPLES = ROOT / "examples"
ISVC = "inferenceservices.serving.forkless.dev"
CHILD_KINDS = "deployments,services,horizontalpodautoscalers,poddisruptionbudgets"
# Field managers of the clients these tests write with; the operator and kopf are none of them.
TEST_MANAGERS = {"forkless-tests", "kubectl", "kubectl-client-side-apply", "kubectl-patch"}
STABLE_S = 3.0  # how long "nothing changes" is watched for

Wait = Callable[..., Any]


@pytest.fixture(scope="module")
def crd(kube: Kube) -> None:
    kube.kubectl("apply", "--server-side", "--field-manager=forkless-tests", "-f", str(CRD_PATH))
    kube.wait_established(ISVC, 30)


class Operator:
    """``forkless-operator run --all-namespaces`` as a subprocess, logging to a file; stop() and start() again."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "the operator is already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forkless_operator.cli", "run", "--all-namespaces", "--standalone",
                 "--metrics-port", "0", "--log-format", "plain"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="module")
def operator(kube: Kube, crd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    handle = Operator({**kube.env, "FORKLESS_OPERATOR_RUNTIME_IMAGE": "forkless-runtime:test"}, log)
    handle.start()
    yield handle
    handle.stop()
    if os.environ.get("FORKLESS_SHOW_OPERATOR_LOG"):
        print(log.read_text()[-20000:])


@pytest.fixture
def running(operator: Operator) -> Operator:
    """The module's operator, started again if a failed test left it stopped."""
    if not operator.alive():
        operator.start()
    return operator


# --- reading the cluster --------------------------------------------------------------------------


def example(name: str, rename: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    if rename:
        body["metadata"]["name"] = rename
    return body


def get_isvc(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.json("get", ISVC, name, "-n", namespace, "--show-managed-fields")  # type: ignore[no-any-return]


def conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in body.get("status", {}).get("conditions", [])}


def ready(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    return conditions(get_isvc(kube, namespace, name)).get("Ready")


def settled(kube: Kube, namespace: str, name: str, condition: str = "Ready") -> dict[str, Any] | None:
    """The InferenceService once ``condition`` is True for its current generation, everywhere; else None."""
    body = get_isvc(kube, namespace, name)
    generation = body["metadata"]["generation"]
    found = conditions(body).get(condition)
    if (
        found
        and found["status"] == "True"
        and found.get("observedGeneration") == generation
        and body["status"].get("observedGeneration") == generation
        and all(c.get("observedGeneration") == generation for c in conditions(body).values())
    ):
        return body
    return None


def deployment(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.json("get", "deployment", name, "-n", namespace, "--show-managed-fields")  # type: ignore[no-any-return]


def env_of(deploy: dict[str, Any]) -> dict[str, str]:
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def children(kube: Kube, namespace: str, kinds: str = CHILD_KINDS) -> list[str]:
    """kind/name of everything in ``namespace`` that carries the operator's labels (pods and ReplicaSets too)."""
    result = kube.kubectl("get", kinds, "-n", namespace, "-l", "app.kubernetes.io/managed-by=forkless-operator",
                          "-o", "name")
    return sorted(result.stdout.split())


def managers_of(body: dict[str, Any], field: str) -> set[str]:
    """Field managers that own anything under top-level ``field`` (``spec``, ``status``)."""
    return {
        entry["manager"]
        for entry in body["metadata"].get("managedFields", [])
        if f"f:{field}" in (entry.get("fieldsV1") or {})
    }


def assert_operator_never_wrote_spec(body: dict[str, Any]) -> None:
    assert managers_of(body, "spec") <= TEST_MANAGERS, body["metadata"]["managedFields"]
    assert FIELD_MANAGER in managers_of(body, "status"), body["metadata"]["managedFields"]


def stays(read: Callable[[], Any], seconds: float = STABLE_S, interval: float = 0.2) -> Any:
    """Read ``read()`` repeatedly for ``seconds``; fail if it ever differs from the first value; return it."""
    first = read()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        assert now == first, f"changed while it should have stayed put: {first!r} -> {now!r}"
    return first


# --- tests ----------------------------------------------------------------------------------------


def test_examples_pass_server_side_dry_run(kube: Kube, crd: None, namespace: str) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))


@pytest.mark.parametrize(("name", "message"), sorted(INVALID_EXAMPLES.items()))
def test_invalid_examples_are_rejected_with_their_message(
    kube: Kube, crd: None, namespace: str, name: str, message: str
) -> None:
    result = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLES / "invalid" / name),
                          check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_gpu_service_becomes_ready_and_repairs_drift(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    body = example("cnn-gpu.yaml")
    body["spec"]["model"]["uri"] = "file:///models/resnet50.pt2"  # no PVC provisioner in the local cluster
    kube.apply(body, namespace=namespace)
    condition = wait_for(lambda: (c := ready(kube, namespace, "cnn-gpu")) and c["status"] == "True" and c,
                         90, "cnn-gpu Ready")
    assert condition["reason"] == "Available"
    status = get_isvc(kube, namespace, "cnn-gpu")["status"]
    assert status["gpus"] == 4 and status["readyReplicas"] == 2 and status["workers"] == 4
    assert status["observedGeneration"] == get_isvc(kube, namespace, "cnn-gpu")["metadata"]["generation"]
    pods = kube.json("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=cnn-gpu")["items"]
    assert {p["spec"]["nodeName"].startswith("gpu-node-") for p in pods} == {True}

    # Drift: a deleted Deployment comes back.
    uid = deployment(kube, namespace, "cnn-gpu")["metadata"]["uid"]
    kube.kubectl("delete", "deployment", "cnn-gpu", "-n", namespace, "--wait=false")
    wait_for(lambda: (d := kube.kubectl("get", "deployment", "cnn-gpu", "-n", namespace, "-o",
                                        "jsonpath={.metadata.uid}", check=False)).returncode == 0
             and d.stdout not in ("", uid), 60, "the Deployment re-created")

    # KServe's address: the -predictor Service selects the same pods, and a deleted one comes back.
    assert status["address"]["url"] == f"http://cnn-gpu-predictor.{namespace}.svc.cluster.local"
    predictor = kube.json("get", "service", "cnn-gpu-predictor", "-n", namespace)
    assert predictor["spec"]["selector"] == kube.json("get", "service", "cnn-gpu", "-n", namespace)["spec"]["selector"]
    kube.kubectl("delete", "service", "cnn-gpu-predictor", "-n", namespace, "--wait=false")
    wait_for(lambda: (s := kube.kubectl("get", "service", "cnn-gpu-predictor", "-n", namespace, "-o",
                                        "jsonpath={.metadata.uid}", check=False)).returncode == 0
             and s.stdout not in ("", predictor["metadata"]["uid"]), 60, "the -predictor Service re-created")

    # Scale subresource.
    kube.kubectl("scale", f"{ISVC}/cnn-gpu", "--replicas=1", "-n", namespace)
    wait_for(lambda: deployment(kube, namespace, "cnn-gpu")["spec"]["replicas"] == 1, 60, "Deployment scaled to 1")


def test_unschedulable_is_surfaced_with_the_scheduler_message(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    body = copy.deepcopy(example("cnn-gpu.yaml", rename="too-big"))
    body["spec"]["model"]["uri"] = "file:///models/resnet50.pt2"
    body["spec"]["replicas"] = 1
    body["spec"]["resources"]["gpus"] = 16  # more than any simulated node has
    body["spec"]["runtime"]["workers"] = 16
    kube.apply(body, namespace=namespace)
    condition = wait_for(lambda: (c := ready(kube, namespace, "too-big")) and c["reason"] == "Unschedulable" and c,
                         60, "too-big Unschedulable")
    assert condition["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in condition["message"]


def test_spec_change_rolls_the_deployment(kube: Kube, namespace: str, running: Operator, wait_for: Wait) -> None:
    kube.apply(example("mlp-cpu.yaml"), namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "mlp-cpu"), 60, "mlp-cpu Ready for generation 1")
    before = deployment(kube, namespace, "mlp-cpu")
    assert env_of(before)["FORKLESS_WORKERS"] == "2" and env_of(before)["FORKLESS_MAX_BATCH_SIZE"] == "16"

    kube.kubectl("patch", ISVC, "mlp-cpu", "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"runtime": {"workers": 3, "batching": {"maxBatchSize": 8}}}}))
    body = wait_for(lambda: settled(kube, namespace, "mlp-cpu"), 60, "mlp-cpu Ready for generation 2")
    assert body["metadata"]["generation"] == 2 and body["status"]["workers"] == 3

    after = deployment(kube, namespace, "mlp-cpu")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # rolled, not re-created
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert env_of(after)["FORKLESS_WORKERS"] == "3" and env_of(after)["FORKLESS_MAX_BATCH_SIZE"] == "8"
    # Ready means the rollout finished: the pods of the new template are the available ones.
    assert after["status"]["observedGeneration"] == after["metadata"]["generation"]
    assert after["status"]["updatedReplicas"] == after["status"]["availableReplicas"] == 1
    replica_sets = kube.json("get", "replicasets", "-n", namespace, "-l", "app.kubernetes.io/instance=mlp-cpu")
    live = [rs for rs in replica_sets["items"] if rs["spec"]["replicas"] > 0]
    assert len(replica_sets["items"]) == 2 and len(live) == 1
    assert env_of(live[0])["FORKLESS_WORKERS"] == "3"
    assert_operator_never_wrote_spec(body)


def test_edited_children_are_repaired(kube: Kube, namespace: str, running: Operator, wait_for: Wait) -> None:
    kube.apply(example("mlp-cpu.yaml"), namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "mlp-cpu"), 60, "mlp-cpu Ready")
    rendered = deployment(kube, namespace, "mlp-cpu")
    selector = kube.json("get", "service", "mlp-cpu", "-n", namespace)["spec"]["selector"]

    kube.kubectl("set", "env", "deployment/mlp-cpu", "-n", namespace, "FORKLESS_WORKERS=9")
    kube.kubectl("scale", "deployment/mlp-cpu", "-n", namespace, "--replicas=4")
    kube.kubectl("patch", "service", "mlp-cpu", "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"selector": {"app.kubernetes.io/instance": "elsewhere"}}}))

    def repaired() -> bool:
        now = deployment(kube, namespace, "mlp-cpu")
        service = kube.json("get", "service", "mlp-cpu", "-n", namespace)
        return (env_of(now) == env_of(rendered) and now["spec"]["replicas"] == 1
                and service["spec"]["selector"] == selector)

    wait_for(repaired, 60, "the edited Deployment and Service applied again")
    body = wait_for(lambda: settled(kube, namespace, "mlp-cpu"), 60, "mlp-cpu Ready after the repair")
    assert body["metadata"]["generation"] == 1
    assert_operator_never_wrote_spec(body)


def test_autoscaling_leaves_replicas_to_the_hpa(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    kube.apply(example("autoscaled.yaml"), namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "autoscaled", "Reconciled"), 60, "autoscaled Reconciled")
    hpa = kube.json("get", "horizontalpodautoscaler", "autoscaled", "-n", namespace)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "autoscaled"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)

    def operator_owns_replicas() -> bool:
        deploy = deployment(kube, namespace, "autoscaled")
        (entry,) = [e for e in deploy["metadata"]["managedFields"] if e["manager"] == FIELD_MANAGER]
        return "f:replicas" in entry["fieldsV1"]["f:spec"]

    assert not operator_owns_replicas()

    # Scale the Deployment as the HPA does (through /scale), then edit it so that the operator
    # must apply it again; once the edit is undone, the HPA's replicas must still stand.
    kube.kubectl("scale", "deployment/autoscaled", "-n", namespace, "--replicas=3")
    kube.kubectl("set", "env", "deployment/autoscaled", "-n", namespace, "FORKLESS_WORKERS=9")
    wait_for(lambda: env_of(deployment(kube, namespace, "autoscaled"))["FORKLESS_WORKERS"] == "2", 60,
             "the edited env applied again")
    assert deployment(kube, namespace, "autoscaled")["spec"]["replicas"] == 3
    assert not operator_owns_replicas()
    body = wait_for(lambda: (b := settled(kube, namespace, "autoscaled")) and b["status"]["readyReplicas"] == 3 and b,
                    DEFER_S + 60, "autoscaled Ready with the 3 replicas the HPA would have set")
    assert body["status"]["replicaSummary"] == "3/3"


def test_applying_the_same_file_again_changes_nothing(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    path = str(EXAMPLES / "mlp-cpu.yaml")
    kube.kubectl("apply", "-n", namespace, "-f", path)
    ssa = yaml.safe_dump(example("mlp-cpu.yaml", rename="mlp-ssa"))
    kube.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=ssa)
    for name in ("mlp-cpu", "mlp-ssa"):
        wait_for(lambda name=name: settled(kube, namespace, name), 60, f"{name} Ready")

    def versions() -> tuple[tuple[str, int], ...]:
        items = kube.json("get", ISVC, "-n", namespace)["items"]
        return tuple((i["metadata"]["resourceVersion"], i["metadata"]["generation"]) for i in items)

    # Once Ready, the operator has said all it has to say: the objects stop changing...
    def quiet() -> tuple[tuple[str, int], ...] | None:
        try:
            return stays(versions, 1.0)  # type: ignore[no-any-return]
        except AssertionError:
            return None

    before = wait_for(quiet, 30, "the InferenceServices to stop changing")
    # ...and applying the same files again changes nothing: no generation, no status, no annotation.
    assert "unchanged" in kube.kubectl("apply", "-n", namespace, "-f", path).stdout
    kube.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=ssa)
    assert stays(versions) == before
    assert all(generation == 1 for _, generation in before)
    for name in ("mlp-cpu", "mlp-ssa"):
        assert_operator_never_wrote_spec(get_isvc(kube, namespace, name))


def test_operator_restart_resumes_without_duplicates(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    kube.apply(example("mlp-cpu.yaml"), namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "mlp-cpu"), 60, "mlp-cpu Ready")
    uid = deployment(kube, namespace, "mlp-cpu")["metadata"]["uid"]

    running.stop()
    try:
        # While no operator runs: a spec change, a new object and an edited child.
        kube.kubectl("patch", ISVC, "mlp-cpu", "-n", namespace, "--type=merge",
                     "-p", json.dumps({"spec": {"runtime": {"workers": 3}}}))
        kube.apply(example("mlp-cpu.yaml", rename="second"), namespace=namespace)
        kube.kubectl("set", "env", "deployment/mlp-cpu", "-n", namespace, "FORKLESS_MAX_QUEUE=1")
        assert conditions(get_isvc(kube, namespace, "second")) == {}  # nobody acted on it
    finally:
        running.start()

    for name in ("mlp-cpu", "second"):
        wait_for(lambda name=name: settled(kube, namespace, name), 60, f"{name} Ready after the restart")
    first = deployment(kube, namespace, "mlp-cpu")
    assert first["metadata"]["uid"] == uid
    assert env_of(first)["FORKLESS_WORKERS"] == "3"
    assert get_isvc(kube, namespace, "mlp-cpu")["status"]["observedGeneration"] == 2

    # Nothing duplicated: one Deployment and one Service each, one set of conditions, one owner.
    assert children(kube, namespace, "deployments,services") == [
        "deployment.apps/mlp-cpu", "deployment.apps/second", "service/mlp-cpu", "service/mlp-cpu-predictor",
        "service/second", "service/second-predictor"]
    for name in ("mlp-cpu", "second"):
        body = get_isvc(kube, namespace, name)
        assert [c["type"] for c in body["status"]["conditions"]] == ["Ready", "Reconciled"]
        deploy = deployment(kube, namespace, name)
        assert len(deploy["metadata"]["ownerReferences"]) == 1
        assert [e["manager"] for e in deploy["metadata"]["managedFields"]].count(FIELD_MANAGER) == 1
        assert_operator_never_wrote_spec(body)


def test_delete_cleans_up_children(kube: Kube, namespace: str, running: Operator, wait_for: Wait) -> None:
    kube.apply(example("autoscaled.yaml"), namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "autoscaled", "Reconciled"), 60, "autoscaled Reconciled")
    wait_for(lambda: len(children(kube, namespace, f"{CHILD_KINDS},pods")) == 6, 60,
             "Deployment, the two Services, HPA, PDB and a pod")
    kube.kubectl("delete", ISVC, "autoscaled", "-n", namespace)
    # Owner references alone clean up; the garbage collector may take up to 30 s to learn a new CRD.
    wait_for(lambda: children(kube, namespace, f"{CHILD_KINDS},replicasets,pods") == [], 60,
             "every child garbage-collected")


def test_kserves_s3_credentials_reach_the_download_and_a_missing_secret_is_named(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    """KServe's sample Secret and ServiceAccount, applied verbatim, feed the init container; a
    ServiceAccount whose Secret does not exist yet is StorageSecretNotFound until it appears."""
    kube.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "kserve" / "s3-secret.yaml"))
    body = {"apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "from-s3"},
            "spec": {"model": {"uri": "s3://models/mlp/"}, "serviceAccountName": "sa"}}
    kube.apply(body, namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "from-s3"), 60, "from-s3 Ready")
    (init,) = deployment(kube, namespace, "from-s3")["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in init["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "mysecret", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_ENDPOINT_URL"] == "https://s3.amazonaws.com" and env["AWS_DEFAULT_REGION"] == "us-east-2"

    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "later"},
                "secrets": [{"name": "not-yet"}]}, namespace=namespace)
    kube.apply({**body, "metadata": {"name": "waiting"}, "spec": {**body["spec"], "serviceAccountName": "later"}},
               namespace=namespace)
    condition = wait_for(lambda: (c := ready(kube, namespace, "waiting")) and c["reason"] == "StorageSecretNotFound"
                         and c, 60, "waiting StorageSecretNotFound")
    assert condition["status"] == "False"
    assert 'secret "not-yet" (listed by serviceaccount "later") must exist in namespace' in condition["message"]
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "not-yet"},
                "stringData": {"HF_TOKEN": "hf_x"}}, namespace=namespace)
    wait_for(lambda: settled(kube, namespace, "waiting"), 90, "waiting Ready once its Secret exists")


def test_converted_kserve_manifests_pass_server_side_dry_run(kube: Kube, crd: None, namespace: str, tmp_path: Path) -> None:
    """What `forkless-operator convert` writes is taken by the API server as it is."""
    from forkless_operator.convert import convert
    from test_convert import FULL, SAMPLES

    sources = [yaml.safe_load(FULL), *(yaml.safe_load(p.read_text()) for p in sorted(SAMPLES.glob("*.yaml")))]
    converted = [r.manifest for r in map(convert, sources) if r.manifest is not None]
    assert len(converted) == 3
    for manifest in converted:
        manifest["metadata"].pop("namespace", None)
    path = tmp_path / "converted.yaml"
    path.write_text(yaml.safe_dump_all(converted))
    kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))


# --- autoscalers ----------------------------------------------------------------------------------

KEDA_CRD = "scaledobjects.keda.sh"


def without_crd(kube: Kube, running: Operator, crd: str) -> None:
    """A cluster without ``crd``, with the operator started on it.

    The CRD is deleted while the operator is stopped: kopf stops the whole operator when its watch of a
    kind whose CRD is being deleted answers 404 before kopf has dropped that watch (the process exits
    non-zero and its Deployment restarts it). Uninstalling KEDA or KubeRay is not what these tests are about.
    """
    running.stop()
    kube.kubectl("delete", "crd", crd, "--ignore-not-found", "--wait=true", "--timeout=60s")
    running.start()


def keda_crds() -> Path:
    """KEDA's CRDs as its pinned module ships them (the version hack/keda.sh runs)."""
    return pinned_module_crds("keda.sh", "keda_version", "github.com/kedacore/keda/v2")


def test_without_keda_class_keda_says_so_and_with_it_every_autoscaler_is_accepted(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    without_crd(kube, running, KEDA_CRD)
    body = example("mlp-cpu.yaml", rename="keda-queue")
    del body["spec"]["replicas"]
    body["spec"]["autoscaling"] = {"class": "keda", "metric": "queueDepth", "target": 4, "maxReplicas": 3}
    kube.apply(body, namespace=namespace)
    missing = wait_for(lambda: (c := ready(kube, namespace, "keda-queue")) and c["reason"] == "KEDANotInstalled" and c,
                       60, "Ready=False KEDANotInstalled")
    assert missing["status"] == "False" and "install KEDA" in missing["message"]
    # KEDA's own CRDs: the operator applies the ScaledObject at its next try (within a minute).
    kube.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=forkless-tests", "-f", str(keda_crds()))
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                         for c in kube.json("get", "crd", KEDA_CRD).get("status", {}).get("conditions") or []),
             60, "KEDA's ScaledObject CRD established")
    scaled = wait_for(lambda: kube.json("get", KEDA_CRD, "-n", namespace, "-o", "json")["items"], 120,
                      "the ScaledObject applied once KEDA's CRDs exist")
    assert scaled[0]["spec"]["triggers"][0]["metadata"]["metric"] == "queueDepth"
    assert not kube.json("get", "hpa", "-n", namespace)["items"]
    # Every class and metric the renderer knows passes the API server's validation of its kind.
    for autoscaling in ({"maxReplicas": 3}, {"maxReplicas": 3, "metric": "inFlight", "target": 2.5},
                        {"class": "keda", "metric": "inFlight", "maxReplicas": 4, "scaleDownSeconds": 30}):
        service = InferenceService.model_validate({**body, "metadata": {"name": "dry", "namespace": namespace,
                                                                        "uid": "00000000-0000-0000-0000-000000000001"},
                                                   "spec": {**body["spec"], "autoscaling": autoscaling}})
        for manifest in render_children(service).values():
            if manifest is not None:
                kube.kubectl("apply", "--dry-run=server", "--server-side", "--field-manager=forkless-tests",
                             "-f", "-", input=json.dumps(manifest))
    # Switching to class hpa replaces the ScaledObject: never two autoscalers on one Deployment.
    kube.kubectl("patch", ISVC, "keda-queue", "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"autoscaling": {"class": "hpa"}}}))
    wait_for(lambda: not kube.json("get", KEDA_CRD, "-n", namespace)["items"]
             and kube.json("get", "hpa", "-n", namespace)["items"], 60, "the HPA instead of the ScaledObject")


# --- engine: ray ----------------------------------------------------------------------------------

RAY_CRD = "rayservices.ray.io"


def kuberay_crds() -> Path:
    """KubeRay's CRDs as its pinned module ships them (the version hack/kuberay.sh runs)."""
    return pinned_module_crds("kuberay.sh", "kuberay_version", "github.com/ray-project/kuberay/ray-operator")


def install_kuberay_crds(kube: Kube) -> None:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=forkless-tests",
                 "-f", str(kuberay_crds()))
    kube.wait_established(RAY_CRD, 60)


def ray_body(name: str) -> dict[str, Any]:
    body = example("ray-cpu.yaml", rename=name)
    body["spec"]["runtime"]["image"] = "localhost/forkless-ray:test"
    return body


def write_ray_status(kube: Kube, namespace: str, name: str, status: dict[str, Any]) -> None:
    """What KubeRay would write, through the status subresource (no KubeRay runs in this test)."""
    kube.kubectl("patch", "rayservice", name, "-n", namespace, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))


def ray_status(generation: int, ready: tuple[str, str], app: str, message: str = "",
               upgrading: bool = False) -> dict[str, Any]:
    now = "2026-11-26T00:00:00Z"
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "numServeEndpoints": 1 if ready[0] == "True" else 0,
        "conditions": [
            {"type": "Ready", "status": ready[0], "reason": ready[1], "message": "", "lastTransitionTime": now},
            {"type": "UpgradeInProgress", "status": "True" if upgrading else "False",
             "reason": "BothActivePendingClustersExist" if upgrading else "NoPendingCluster", "message": "",
             "lastTransitionTime": now}],
        "activeServiceStatus": {
            "rayClusterName": "ray-states-abcde",
            "applicationStatuses": {"mlp": {"status": app, "message": message, "serveDeploymentStatuses": {
                "ForklessModel": {"status": "UNHEALTHY" if app == "UNHEALTHY" else "HEALTHY",
                                  "message": "a replica died" if app == "UNHEALTHY" else ""}}}},
            "rayClusterStatus": {"desiredWorkerReplicas": 1, "readyWorkerReplicas": 1, "desiredGPU": "0"}},
    }
    if upgrading:
        status["pendingServiceStatus"] = {"rayClusterName": "ray-states-fghij", "applicationStatuses": {
            "mlp": {"status": "DEPLOYING", "message": ""}}}
    return status


def test_without_kuberay_engine_ray_says_so_then_the_rayservice_follows_and_passes_dry_run(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    without_crd(kube, running, RAY_CRD)
    kube.apply(ray_body("ray-missing"), namespace=namespace)
    missing = wait_for(lambda: (c := ready(kube, namespace, "ray-missing")) and c["reason"] == "KubeRayNotInstalled"
                       and c, 60, "Ready=False KubeRayNotInstalled")
    assert missing["status"] == "False" and "install KubeRay" in missing["message"]
    assert not kube.json("get", "deployments,services", "-n", namespace, "-l",
                         "app.kubernetes.io/instance=ray-missing")["items"]
    install_kuberay_crds(kube)
    applied = wait_for(lambda: kube.json("get", "rayservices", "-n", namespace)["items"], 120,
                       "the RayService applied once KubeRay's CRDs exist")
    assert applied[0]["metadata"]["ownerReferences"][0]["name"] == "ray-missing"
    # Every rendered RayService passes KubeRay v1.5.0's schema: GPU and CPU, autoscaled, haproxy, podTemplate.
    for name, spec_change in (("ray-gpu.yaml", {}), ("ray-cpu.yaml", {"ray": {"ingress": "haproxy",
                                                                             "upgradeStrategy": "None"}}),
                              ("ray-cpu.yaml", {"podTemplate": {"spec": {"runtimeClassName": "nvidia"}}})):
        body = example(name)
        service = InferenceService.model_validate({**body, "metadata": {
            "name": "dry", "namespace": namespace, "uid": "00000000-0000-0000-0000-000000000001"},
            "spec": {**body["spec"], **spec_change}})
        (manifest,) = [m for m in render_children(service).values() if m is not None]
        kube.kubectl("apply", "--dry-run=server", "--server-side", "--field-manager=forkless-tests",
                     "-f", "-", input=json.dumps(manifest))


def test_engine_ray_status_follows_every_rayservice_state(
    kube: Kube, namespace: str, running: Operator, wait_for: Wait
) -> None:
    install_kuberay_crds(kube)
    kube.apply(ray_body("ray-states"), namespace=namespace)
    rayservice = wait_for(lambda: kube.json("get", "rayservices", "-n", namespace, "-o", "json")["items"], 60,
                          "the RayService")[0]
    generation = rayservice["metadata"]["generation"]

    def reaches(status: dict[str, Any], condition: str, state: str, reason: str) -> dict[str, Any]:
        # Each state is news and is written at once. KubeRay's CRD appeared while the operator ran, so kopf
        # often never watches RayServices (discovery lags the CRD's events); the operator's own read of the
        # RayService every 15 s (handlers.follow_ray_service) carries the status then.
        write_ray_status(kube, namespace, "ray-states", status)
        return wait_for(lambda: (c := conditions(get_isvc(kube, namespace, "ray-states")).get(condition))
                        and (c["status"], c["reason"]) == (state, reason) and c, 120, f"{condition}={state} {reason}")

    # (Moves between two ordinary steps on the way, RayInitializing and ServeDeploying, are written lazily by
    # design: each state below is news after the one before it.)
    reaches(ray_status(generation, ("False", "Initializing"), "DEPLOYING"), "Ready", "False", "RayInitializing")
    failed = reaches(ray_status(generation, ("True", "NonZeroServeEndpoints"), "DEPLOY_FAILED",
                                "ImportError: no module named handlers"), "Ready", "False", "ServeDeployFailed")
    assert "no module named handlers" in failed["message"]
    reaches(ray_status(generation - 1, ("True", "NonZeroServeEndpoints"), "RUNNING"), "Ready", "False",
            "RayInitializing")  # KubeRay has not seen this generation: its Ready is about the last one
    reaches(ray_status(generation, ("True", "NonZeroServeEndpoints"), "RUNNING"), "Ready", "True", "Serving")
    reaches(ray_status(generation, ("True", "NonZeroServeEndpoints"), "DEPLOYING"), "Ready", "False", "ServeDeploying")
    reaches(ray_status(generation, ("True", "NonZeroServeEndpoints"), "RUNNING"), "Ready", "True", "Serving")
    body = get_isvc(kube, namespace, "ray-states")
    assert body["status"]["url"] == f"http://ray-states-serve-svc.{namespace}.svc.cluster.local:8000"
    assert body["status"]["ray"]["activeCluster"] == "ray-states-abcde"
    degraded = reaches(ray_status(generation, ("True", "NonZeroServeEndpoints"), "UNHEALTHY"), "Degraded", "True",
                       "ServeDeploymentUnhealthy")
    assert "a replica died" in degraded["message"]
    assert ready(kube, namespace, "ray-states")["reason"] == "ServeUnhealthy"
    upgrading = reaches(ray_status(generation, ("True", "NonZeroServeEndpoints"), "RUNNING", upgrading=True),
                        "Upgrading", "True", "NewClusterPending")
    assert "ray-states-fghij" in upgrading["message"]
    reaches(ray_status(generation, ("False", "ZeroServeEndpoints"), "RUNNING"), "Ready", "False", "NoServeEndpoints")
    reaches(ray_status(generation, ("False", "InitializingTimeout"), "DEPLOYING"), "Ready", "False",
            "RayInitializingTimeout")
    # engine is immutable, and a long name is refused, by the API server with the model's messages.
    result = kube.kubectl("patch", ISVC, "ray-states", "-n", namespace, "--type=merge",
                          "-p", '{"spec": {"engine": "deployment", "ray": null}}', check=False)
    assert result.returncode != 0 and "engine cannot change" in result.stderr, result.stderr
    result = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", check=False,
                          input=json.dumps(ray_body("r" * 48)))
    assert result.returncode != 0 and "at most 47 characters" in result.stderr, result.stderr


@pytest.fixture
def kuberay(kube: Kube) -> Iterator[None]:
    """KubeRay v1.5.0's operator, built from its Go module (hack/kuberay.sh, cached), beside the cluster."""
    with beside_the_cluster(kube, "kuberay.sh"):
        yield


def test_kuberay_puts_the_gpu_worker_pods_on_gpu_nodes_with_their_limits(
    kube: Kube, namespace: str, running: Operator, kuberay: None, wait_for: Wait
) -> None:
    body = example("ray-gpu.yaml", rename="ray-kwok")
    body["spec"]["resources"] = {"gpus": 2, "cpu": "2", "memory": "4Gi"}
    body["spec"]["ray"]["head"] = {"cpu": "500m", "memory": "1Gi"}
    body["spec"]["runtime"]["image"] = "localhost/forkless-ray:test"
    del body["spec"]["autoscaling"]
    kube.apply(body, namespace=namespace)

    def pods() -> list[dict[str, Any]] | None:
        found = kube.json("get", "pods", "-n", namespace, "-l", "ray.io/node-type")["items"]
        return found if len(found) == 3 and all(p["spec"].get("nodeName") for p in found) else None

    found = wait_for(pods, 120, "KubeRay's head and 2 GPU worker pods, scheduled")
    nodes = {n["metadata"]["name"]: n for n in kube.json("get", "nodes")["items"]}
    workers = [p for p in found if p["metadata"]["labels"]["ray.io/node-type"] == "worker"]
    (head,) = [p for p in found if p["metadata"]["labels"]["ray.io/node-type"] == "head"]
    assert len(workers) == 2
    for pod in workers:
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert nodes[pod["spec"]["nodeName"]]["status"]["capacity"].get("nvidia.com/gpu"), pod["spec"]["nodeName"]
        assert "--num-gpus=1" in " ".join(container.get("args") or [])
        assert pod["spec"]["initContainers"][0]["name"] == "download-model"  # the model's download, as in a Deployment
    assert not nodes[head["spec"]["nodeName"]]["status"]["capacity"].get("nvidia.com/gpu")
    assert "nvidia.com/gpu" not in json.dumps(head["spec"]["containers"][0]["resources"])
    # No dashboard answers on kwok, so the Serve app never deploys: Ready stays False, saying why.
    condition = stays(lambda: ready(kube, namespace, "ray-kwok"), seconds=3)
    assert condition["status"] == "False" and condition["reason"] == "RayInitializing", condition
