"""KServe's custom predictor, unmodified, in real pods, and spec.podTemplate on a real pod.

The runtime image as built, with KServe 0.21 and the predictor module mounted from the host
through the pod template (volumes, mounts, PYTHONPATH: what the example's Containerfile bakes
in), the model file from a third volume. The same InferenceService's pod template adds a label,
an annotation, a pause-image sidecar, a RuntimeClass, a CPU limit and an ephemeral-storage
limit: each is checked on the pod the kubelet runs, and the answer through the Service is
checked against the predictor class run directly with KServe.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, Helm, Kube, RealNode, wait_for
from tests.realnode.conftest import install_operator, service_url

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(900)]

ISVC = "inferenceservices.serving.forkless.dev"
NAME = "custom-model"
EXAMPLE = REPO / "examples" / "kserve" / "custom-predictor"
KSERVE_ENV = REPO / ".venv-kserve"
RUNTIME_CLASS = "forkless-test-runc"
READY_TIMEOUT_S = 300


@dataclass
class Deployed:
    namespace: str
    url: str
    model_dir: Path


def images_ref(image: str) -> str:
    return subprocess.run([str(REPO / "hack" / "images.sh"), "ref", image], capture_output=True, text=True,
                          check=True).stdout.strip()


def ready(kube: Kube, namespace: str) -> bool:
    body = kube.json("get", ISVC, NAME, "-n", namespace)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in body.get("status", {}).get("conditions", []))


def host_path(name: str, path: Path) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": str(path), "type": "Directory"}}


@pytest.fixture(scope="module")
def deployed(kube: Kube, real_node: RealNode, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    if not (KSERVE_ENV / ".installed").exists():
        pytest.fail("KServe 0.21 is not installed beside the venv: run `make kserve-env` (make test does)")
    namespace = f"kserve-pod-{int(time.time()) % 100000}"
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "forkless.test/scratch=true")
    model_dir = tmp_path_factory.mktemp("kserve-model")
    subprocess.run([sys.executable, str(EXAMPLE / "make_model.py"), str(model_dir)], check=True, capture_output=True)
    model_dir.chmod(0o755)
    try:
        install_operator(kube, helm, namespace, "forkless")
        kube.apply({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": RUNTIME_CLASS},
                    "handler": "runc"})
        kube.apply({
            "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": NAME, "namespace": namespace},
            "spec": {
                "model": {"name": NAME, "uri": "file:///opt/model", "format": "kserve",
                          "handler": "model:ImageClassifier"},
                "runtime": {"workers": 2, "threadsPerWorker": 1},
                "resources": {"cpu": "100m", "memory": "3Gi"},
                "scheduling": RealNode.scheduling(),
                "podTemplate": {
                    "metadata": {"labels": {"team": "vision"}, "annotations": {"example.com/owner": "tests"}},
                    "spec": {
                        "runtimeClassName": RUNTIME_CLASS,
                        "volumes": [host_path("kserve", KSERVE_ENV), host_path("predictor", EXAMPLE),
                                    host_path("weights", model_dir)],
                        "containers": [
                            {"name": "runtime",
                             "env": [{"name": "PYTHONPATH", "value": "/opt/kserve:/opt/predictor"}],
                             "volumeMounts": [{"name": "kserve", "mountPath": "/opt/kserve", "readOnly": True},
                                              {"name": "predictor", "mountPath": "/opt/predictor", "readOnly": True},
                                              {"name": "weights", "mountPath": "/opt/model", "readOnly": True}],
                             "resources": {"limits": {"cpu": "2", "ephemeral-storage": "1Gi"}}},
                            {"name": "sidecar", "image": images_ref("pause"), "imagePullPolicy": "IfNotPresent",
                             "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}}},
                        ],
                    },
                },
            },
        })
        wait_for(lambda: ready(kube, namespace), READY_TIMEOUT_S, f"InferenceService {namespace}/{NAME} Ready")
        yield Deployed(namespace, service_url(kube, namespace, NAME), model_dir)
    finally:
        kube.kubectl("delete", ISVC, NAME, "-n", namespace, "--wait=true", "--timeout=90s", check=False)
        helm("uninstall", "forkless", "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig, check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=90s", check=False)
        kube.kubectl("delete", "runtimeclass", RUNTIME_CLASS, "--wait=false", check=False)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


EXPECTED_SCRIPT = """
import asyncio, json, sys
sys.argv = ["predictor", "--model_dir", sys.argv[1]]
import model
predictor = model.ImageClassifier("custom-model")
predictor.load()
body = json.loads(sys.stdin.read())
response, _headers = asyncio.run(predictor(body, headers={"x-top-k": "4"}))
print(json.dumps(response))
"""


def kserve_answer(model_dir: Path, body: dict[str, Any]) -> dict[str, Any]:
    """What the predictor class answers when KServe calls it directly, in this process's stead."""
    result = subprocess.run([sys.executable, "-c", EXPECTED_SCRIPT, str(model_dir)], input=json.dumps(body),
                            capture_output=True, text=True, check=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(KSERVE_ENV), str(EXAMPLE)])})
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_the_unmodified_predictor_answers_through_the_service_as_kserve_calls_it(deployed: Deployed) -> None:
    body = {"instances": [{"image": {"b64": base64.b64encode(png(seed)).decode()}} for seed in (1, 2)]}
    response = httpx.post(f"{deployed.url}/v1/models/{NAME}:predict", json=body, headers={"x-top-k": "4"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == kserve_answer(deployed.model_dir, body)
    assert float(response.headers["prediction-time-latency"]) >= 0  # the model's own response header
    bad = httpx.post(f"{deployed.url}/v1/models/{NAME}:predict", json={"instances": [{"x": 1}]}, timeout=30)
    assert bad.status_code == 400 and "image.b64" in bad.json()["error"]


def test_the_pod_carries_what_the_pod_template_adds(kube: Kube, deployed: Deployed) -> None:
    (pod,) = kube.json("get", "pods", "-n", deployed.namespace, "-l", f"app.kubernetes.io/instance={NAME}")["items"]
    assert pod["metadata"]["labels"]["team"] == "vision"
    assert pod["metadata"]["annotations"]["example.com/owner"] == "tests"
    assert pod["spec"]["runtimeClassName"] == RUNTIME_CLASS
    statuses = {s["name"]: s for s in pod["status"]["containerStatuses"]}
    assert set(statuses) == {"runtime", "sidecar"} and all(s["ready"] for s in statuses.values())
    runtime = next(c for c in pod["spec"]["containers"] if c["name"] == "runtime")
    assert runtime["resources"]["limits"] == {"cpu": "2", "ephemeral-storage": "1Gi", "memory": "3Gi"}
    # The API server defaults a request from a limit given alone (ephemeral-storage).
    assert runtime["resources"]["requests"] == {"cpu": "100m", "memory": "3Gi", "ephemeral-storage": "1Gi"}
    assert runtime["command"] == ["forkless-runtime", "serve"]
