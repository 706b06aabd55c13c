"""forkless in real pods: the chart's operator from its image, reconciling an InferenceService
whose pods start from the built runtime image on the local cluster's real node (kubelet,
containerd, runc, kube-proxy), load a model from a PersistentVolumeClaim and answer through
their Service's ClusterIP.

One chart release (watching only this module's namespace) and one InferenceService (two
replicas, one worker each) serve the whole module; the tests run in file order and each leaves
the InferenceService Ready. What a user would notice is asserted: correct answers, worker lines
in `kubectl logs`, no request lost when a pod is deleted under load, a SIGKILLed container
restarted by the kubelet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO, Helm, Kube, RealNode, wait_for
from tests.realnode.conftest import LOCAL_VALUES, install_operator, service_url

# The first test also waits for the module's set-up: images imported into the node (about two
# minutes for the runtime image's 5 GB), the chart installed, the InferenceService Ready.
pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(900)]

ISVC = "inferenceservices.serving.forkless.dev"
NAME = "mlp"
CLAIM = "models"
READY_TIMEOUT_S = 240


def images_sh(*args: str) -> str:
    return subprocess.run([str(REPO / "hack" / "images.sh"), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass
class Deployed:
    namespace: str
    release: str
    models: Path
    url: str  # the Service's ClusterIP, port 80
    ready_after_s: float


def ready(kube: Kube, namespace: str) -> bool:
    body = kube.json("get", ISVC, NAME, "-n", namespace)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in body.get("status", {}).get("conditions", []))


def runtime_pods(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    return list(kube.json("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={NAME}")["items"])


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def all_replicas_ready(kube: Kube, namespace: str, replicas: int = 2) -> list[dict[str, Any]] | None:
    pods = [p for p in runtime_pods(kube, namespace) if not p["metadata"].get("deletionTimestamp")]
    return pods if len(pods) == replicas and all(pod_ready(p) for p in pods) else None


@pytest.fixture(scope="module")
def deployed(kube: Kube, real_node: RealNode, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    namespace = f"realnode-{int(time.time()) % 100000}"
    release = "forkless"
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "forkless.test/scratch=true")
    models = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(models)], check=True)
    models.chmod(0o755)
    pv = f"{CLAIM}-{namespace}"
    try:
        install_operator(kube, helm, namespace, release)
        kube.apply(
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
             "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                      "persistentVolumeReclaimPolicy": "Retain", "local": {"path": str(models)},
                      "claimRef": {"namespace": namespace, "name": CLAIM},
                      "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                          {"key": "kubernetes.io/hostname", "operator": "In", "values": [real_node.name]}]}]}}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM, "namespace": namespace},
             "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                      "resources": {"requests": {"storage": "1Gi"}}}},
        )
        applied = time.monotonic()
        kube.apply({
            "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": NAME, "namespace": namespace},
            "spec": {
                "replicas": 2,
                "model": {"name": NAME, "uri": f"pvc://{CLAIM}/mlp.pt", "format": "torchscript"},
                "runtime": {"workers": 1, "threadsPerWorker": 1, "batching": {"maxBatchSize": 8, "maxDelayMs": 2}},
                "resources": {"cpu": "100m", "memory": "1Gi"},
                "scheduling": RealNode.scheduling(),
            },
        })
        wait_for(lambda: ready(kube, namespace), READY_TIMEOUT_S, f"InferenceService {namespace}/{NAME} Ready")
        ready_after = time.monotonic() - applied
        yield Deployed(namespace, release, models, service_url(kube, namespace, NAME), ready_after)
    finally:
        kube.kubectl("delete", ISVC, NAME, "-n", namespace, "--wait=true", "--timeout=90s", check=False)
        helm("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig, check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=90s", check=False)
        kube.kubectl("delete", "pv", pv, "--wait=false", check=False)


def infer(client: httpx.Client, url: str, rows: list[list[float]]) -> httpx.Response:
    body = {"inputs": [{"name": "input-0", "shape": [len(rows), 16], "datatype": "FP32",
                        "data": [x for row in rows for x in row]}]}
    return client.post(f"{url}/v2/models/{NAME}/infer", json=body, timeout=30)


def test_local_values_name_the_images_hack_images_builds() -> None:
    values = yaml.safe_load(LOCAL_VALUES.read_text())
    assert f"{values['image']['repository']}:{values['image']['tag']}" == images_sh("ref", "operator")
    assert values["defaults"]["runtimeImage"] == images_sh("ref", "runtime")


def test_the_operator_runs_from_its_image_in_a_pod_on_the_real_node(
    kube: Kube, real_node: RealNode, deployed: Deployed
) -> None:
    """The chart's operator, in its own pod and ServiceAccount, is what reconciled the InferenceService."""
    (pod,) = kube.json("get", "pods", "-n", deployed.namespace, "-l", "app.kubernetes.io/name=forkless-operator")["items"]
    assert pod["spec"]["nodeName"] == real_node.name
    assert pod["spec"]["serviceAccountName"] == "forkless"
    (container,) = pod["status"]["containerStatuses"]
    assert container["image"] == images_sh("ref", "operator") and container["ready"]
    deployment = kube.json("get", "deployment", NAME, "-n", deployed.namespace)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "forkless-operator"
    # The operator's own log, read back through the kubelet, shows it reconciling this object.
    logs = kube.kubectl("logs", "-n", deployed.namespace, pod["metadata"]["name"]).stdout
    reconciled = [entry for entry in map(json.loads, logs.splitlines())
                  if entry.get("object", {}).get("kind") == "InferenceService"
                  and entry["object"]["name"] == NAME and entry["object"]["namespace"] == deployed.namespace
                  and entry["message"].startswith("reconciled generation")]
    assert reconciled, logs[-3000:]


def test_pods_start_from_the_built_image_and_answer_correctly_through_the_service(
    kube: Kube, real_node: RealNode, deployed: Deployed
) -> None:
    import torch

    print(f"apply -> Ready on the real node: {deployed.ready_after_s:.1f} s")
    pods = runtime_pods(kube, deployed.namespace)
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == real_node.name
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"] == images_sh("ref", "runtime") and container["ready"]
    # The container really runs there: containerd holds a task for it.
    tasks = real_node.ctr("tasks", "ls")
    for pod in pods:
        container_id = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
        assert container_id in tasks

    rows = [[0.1 * i + j for i in range(16)] for j in range(3)]
    expected = torch.jit.load(str(deployed.models / "mlp.pt"))(torch.tensor(rows)).tolist()
    before = {pod["metadata"]["name"]: served(pod) for pod in pods}
    # A new connection each: kube-proxy spreads them over both pods. Ready can come a moment
    # before kube-proxy has programmed the second endpoint, so go on (a bounded number of
    # requests) until both have answered, every answer checked.
    for attempt in range(60):
        if attempt >= 12 and all(served(pod) > before[pod["metadata"]["name"]] for pod in pods):
            break
        with httpx.Client() as client:
            response = infer(client, deployed.url, rows)
            assert response.status_code == 200, response.text
            (output,) = response.json()["outputs"]
            assert output["shape"] == [3, 3]
            assert output["data"] == pytest.approx([x for row in expected for x in row], rel=1e-5, abs=1e-6)
    with httpx.Client() as client:
        v1 = client.post(f"{deployed.url}/v1/models/{NAME}:predict", json={"instances": rows[:1]}, timeout=30)
        assert v1.status_code == 200 and v1.json()["predictions"][0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert all(served(pod) > before[pod["metadata"]["name"]] for pod in pods), "both pods answer through the Service"


def test_kubectl_logs_show_the_worker_lines(kube: Kube, deployed: Deployed) -> None:
    for pod in runtime_pods(kube, deployed.namespace):
        logs = kube.kubectl("logs", "-n", deployed.namespace, pod["metadata"]["name"]).stdout
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        loaded = [entry for entry in lines if entry["worker"] == "worker-0" and entry["msg"].startswith("loaded")]
        assert loaded, logs[-3000:]
        assert "/mnt/models/mlp.pt" in loaded[0]["msg"]
        assert any(entry["worker"] == "frontend" and "worker 0 ready" in entry["msg"] for entry in lines)


class Load:
    """Client threads posting through the Service, each on its own kept-alive connection, counting outcomes."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]

    def _send(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                try:
                    outcome = str(infer(client, self.url, [[1.0] * 16]).status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                    with self._lock:
                        self.errors.append(repr(exc))
                with self._lock:
                    self.outcomes[outcome] += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def served(pod: dict[str, Any]) -> float:
    """Requests a runtime pod has answered, from its own /metrics (the host reaches pod IPs)."""
    text = httpx.get(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("forkless_requests_total{"))


def test_deleting_a_pod_under_load_loses_no_request(kube: Kube, deployed: Deployed) -> None:
    """SIGTERM drain: the pod turns unready and keeps answering while the Service stops routing to it."""
    pods = wait_for(lambda: all_replicas_ready(kube, deployed.namespace), READY_TIMEOUT_S, "two ready replicas")
    victim = pods[0]
    with Load(deployed.url) as load:
        wait_for(lambda: all(served(p) > 0 for p in pods), 30, "both pods answering the load")
        kube.kubectl("delete", "pod", "-n", deployed.namespace, victim["metadata"]["name"], "--wait=false")
        wait_for(lambda: (kube.kubectl("get", "pod", "-n", deployed.namespace, victim["metadata"]["name"],
                                       check=False).returncode != 0), 90, "the deleted pod gone")
        wait_for(lambda: all_replicas_ready(kube, deployed.namespace), READY_TIMEOUT_S, "its replacement ready")
        before = sum(load.outcomes.values())
        wait_for(lambda: sum(load.outcomes.values()) > before + 20, 30, "requests after the replacement")
    print(f"outcomes while a pod was deleted: {dict(load.outcomes)}")
    assert set(load.outcomes) == {"200"}, (dict(load.outcomes), load.errors[:5])


def test_a_sigkilled_container_is_restarted_by_the_kubelet_and_serves_again(
    kube: Kube, real_node: RealNode, deployed: Deployed
) -> None:
    pods = wait_for(lambda: all_replicas_ready(kube, deployed.namespace), READY_TIMEOUT_S, "two ready replicas")
    pod = pods[0]
    name = pod["metadata"]["name"]
    (status,) = pod["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("containerd://")
    (pid,) = [line.split()[1] for line in real_node.ctr("tasks", "ls").splitlines()[1:] if line.split()[0] == container_id]
    subprocess.run(["kill", "-KILL", pid], check=True)

    def restarted() -> dict[str, Any] | None:
        current = kube.json("get", "pod", name, "-n", deployed.namespace)
        (container,) = current["status"]["containerStatuses"]
        return current if container["restartCount"] > status["restartCount"] and pod_ready(current) else None

    current = wait_for(restarted, READY_TIMEOUT_S, f"pod {name} restarted by the kubelet and ready again")
    last = current["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 137 and last["reason"] == "Error", last
    assert httpx.get(f"http://{current['status']['podIP']}:8080/v2/health/ready", timeout=10).status_code == 200
    with httpx.Client() as client:
        answers = [infer(client, deployed.url, [[1.0] * 16]).status_code for _ in range(10)]
    assert answers == [200] * 10


TRITON_GRPC_CLIENT = """
import sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
tensor = grpcclient.InferInput("input-0", [2, 16], "FP32")
tensor.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
answer = client.infer(sys.argv[2], [tensor])
print(client.is_server_ready(), client.is_model_ready(sys.argv[2]), list(answer.as_numpy("output-0").shape))
"""


def test_a_triton_grpc_client_reaches_the_pods_through_the_services_grpc_port(kube: Kube, deployed: Deployed) -> None:
    service = kube.json("get", "service", NAME, "-n", deployed.namespace)
    grpc_port = next(port for port in service["spec"]["ports"] if port["name"] == "grpc")
    assert grpc_port["port"] == 8081 and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    # tritonclient's protobuf module and the runtime's share a package name: the client runs in its own process.
    run = subprocess.run([sys.executable, "-c", TRITON_GRPC_CLIENT, f"{service['spec']['clusterIP']}:8081", NAME],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True", "[2,", "3]"]
