"""engine: ray for real: KubeRay v1.5.0 (built from its Go module, hack/kuberay.sh) runs an InferenceService's
RayService on the real node from the forkless-ray image (runtime/Dockerfile.ray): a Ray head and a worker pod,
the operator installed by the chart. The InferenceService is Ready only once Serve's application RUNNING (it is
watched the whole way up), and the serve Service answers V1 and V2 with the model's own results.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, Helm, Kube, RealNode, beside_the_cluster, wait_for
from tests.realnode.conftest import install_operator

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(1500)]

ISVC = "inferenceservices.serving.forkless.dev"
NAME = "ray-mlp"
READY_TIMEOUT_S = 900


def images_ref(image: str) -> str:
    return subprocess.run([str(REPO / "hack" / "images.sh"), "ref", image], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass
class Watched:
    """(InferenceService Ready, its reason, KubeRay's Ready, the Serve app's status), sampled on the way up."""

    samples: list[tuple[str, str, str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class Deployed:
    namespace: str
    url: str
    model: Path
    watched: Watched


def conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in body.get("status", {}).get("conditions") or []}


def sample(kube: Kube, namespace: str) -> tuple[str, str, str, str]:
    isvc = conditions(kube.json("get", ISVC, NAME, "-n", namespace)).get("Ready", {})
    found = kube.json("get", "rayservices", "-n", namespace)["items"]
    status = found[0].get("status", {}) if found else {}
    kuberay = next((c["status"] for c in status.get("conditions") or [] if c["type"] == "Ready"), "-")
    app = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get("mlp", {}).get("status", "-")
    return isvc.get("status", "-"), isvc.get("reason", "-"), kuberay, app


@pytest.fixture(scope="module")
def kuberay(kube: Kube, real_node: RealNode) -> Iterator[None]:
    with beside_the_cluster(kube, "kuberay.sh"):
        yield


@pytest.fixture(scope="module")
def deployed(kube: Kube, real_node: RealNode, helm: Helm, kuberay: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    namespace = f"ray-pod-{int(time.time()) % 100000}"
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "forkless.test/scratch=true")
    models = tmp_path_factory.mktemp("ray-models")
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(models)], check=True,
                   capture_output=True)
    models.chmod(0o755)
    watched = Watched()
    try:
        install_operator(kube, helm, namespace, "forkless")
        kube.apply({
            "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": NAME, "namespace": namespace},
            "spec": {
                "engine": "ray",
                "model": {"name": "mlp", "uri": "file:///opt/models/mlp.pt", "format": "torchscript", "signature": {
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}]}},
                "runtime": {"image": images_ref("ray"), "workers": 2, "threadsPerWorker": 1,
                            "batching": {"maxBatchSize": 16, "maxDelayMs": 2}},
                "resources": {"cpu": "1", "memory": "4Gi"},
                "scheduling": RealNode.scheduling(),
                "ray": {"head": {"cpu": "500m", "memory": "3Gi"}, "startupTimeoutSeconds": 1200},
                "podTemplate": {"spec": {
                    "volumes": [{"name": "models", "hostPath": {"path": str(models), "type": "Directory"}}],
                    "containers": [{"name": "runtime", "volumeMounts": [
                        {"name": "models", "mountPath": "/opt/models", "readOnly": True}]}]}},
            },
        }, namespace=namespace)

        def watch() -> None:
            while not watched.stop.is_set():
                with contextlib.suppress(Exception):  # a missed sample is no finding
                    watched.samples.append(sample(kube, namespace))
                watched.stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        applied = time.monotonic()
        watcher.start()
        wait_for(lambda: watched.samples and watched.samples[-1][0] == "True", READY_TIMEOUT_S,
                 f"InferenceService {namespace}/{NAME} Ready")
        print(f"engine ray: applied to Ready in {time.monotonic() - applied:.1f} s")
        watched.stop.set()
        watcher.join()
        service = kube.json("get", "service", f"{NAME}-serve-svc", "-n", namespace)
        yield Deployed(namespace, f"http://{service['spec']['clusterIP']}:8000", models / "mlp.pt", watched)
    finally:
        watched.stop.set()
        if watched.samples:
            print("samples (isvc Ready, reason, KubeRay Ready, app):", sorted(set(watched.samples)))
        for pod in kube.json("get", "pods", "-n", namespace)["items"]:
            print(pod["metadata"]["name"], json.dumps(pod["status"].get("containerStatuses"))[:1500])
        kube.kubectl("delete", ISVC, NAME, "-n", namespace, "--wait=true", "--timeout=120s", check=False)
        helm("uninstall", "forkless", "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig, check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    import torch

    return torch.jit.load(str(model))(torch.from_numpy(x)).detach().numpy()


def test_ready_only_once_the_serve_application_runs(deployed: Deployed, kube: Kube) -> None:
    ready = [s for s in deployed.watched.samples if s[0] == "True"]
    assert ready and all(app == "RUNNING" and kuberay == "True" for _, _, kuberay, app in ready), ready
    assert any(s[0] == "False" for s in deployed.watched.samples)  # it was watched on the way up
    body = kube.json("get", ISVC, NAME, "-n", deployed.namespace)
    assert body["status"]["url"] == f"http://{NAME}-serve-svc.{deployed.namespace}.svc.cluster.local:8000"
    assert body["status"]["ray"]["appStatus"] == "RUNNING"
    assert body["status"]["ray"]["activeCluster"].startswith(NAME)


def _answered(url: str, body: dict[str, Any]) -> httpx.Response | None:
    """The answer, or None while the connection is refused."""
    try:
        return httpx.post(url, json=body, timeout=60)
    except httpx.ConnectError:
        return None


def test_the_serve_service_answers_v2_and_v1_with_the_models_results(deployed: Deployed) -> None:
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [4, 16], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    # Ready follows KubeRay's, which counts the serve Service's endpoints; kube-proxy on the node can
    # program them a moment later (CI saw one connection refused right after Ready): up to 60 s for that.
    answer = wait_for(lambda: _answered(f"{deployed.url}/v2/models/mlp/infer", body), 60,
                      "the serve Service accepting connections")
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["name"] == "scores"
    np.testing.assert_allclose(np.array(output["data"]).reshape(4, 3), reference(deployed.model, x), rtol=1e-5)
    v1 = httpx.post(f"{deployed.url}/v1/models/mlp:predict", json={"instances": x.tolist()}, timeout=60)
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(np.array(v1.json()["predictions"]), reference(deployed.model, x), rtol=1e-5)
    wrong = httpx.post(f"{deployed.url}/v2/models/mlp/infer", timeout=60,
                       json={"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
    assert wrong.status_code == 400 and "input 'x'" in wrong.json()["error"]
