"""The CRD and the operator against the real local control plane (simulated GPU nodes by kwok)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from forkless_operator.crd import CRD_FILENAME
from test_operator_spec import INVALID_EXAMPLES  # tests/operator is on sys.path (rootdir-less test dirs)

if TYPE_CHECKING:
    from tests.conftest import Kube

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / CRD_FILENAME
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def crd(kube: Kube) -> None:
    kube.kubectl("apply", "--server-side", "--field-manager=forkless-tests", "-f", str(CRD_PATH))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                 "crd/inferenceservices.serving.forkless.dev")


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def get_isvc(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.json("get", "inferenceservices.serving.forkless.dev", name, "-n", namespace)


def ready(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    body = get_isvc(kube, namespace, name)
    conditions = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
    return conditions.get("Ready")


@pytest.fixture
def operator(kube: Kube, crd: None, namespace: str) -> Iterator[subprocess.Popen[str]]:
    """The operator as users run it, watching only this test's namespace."""
    env = {**kube.env, "FORKLESS_OPERATOR_RUNTIME_IMAGE": "forkless-runtime:test"}
    process = subprocess.Popen(
        [sys.executable, "-m", "forkless_operator.cli", "run", "-n", namespace, "--standalone",
         "--metrics-port", "0", "--log-format", "plain"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    yield process
    process.terminate()
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    if os.environ.get("FORKLESS_SHOW_OPERATOR_LOG"):
        print(output[-20000:])


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
    kube: Kube, namespace: str, operator: subprocess.Popen[str], wait_for: Callable[..., Any]
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
    uid = kube.json("get", "deployment", "cnn-gpu", "-n", namespace)["metadata"]["uid"]
    kube.kubectl("delete", "deployment", "cnn-gpu", "-n", namespace, "--wait=false")
    wait_for(lambda: (d := kube.kubectl("get", "deployment", "cnn-gpu", "-n", namespace, "-o",
                                        "jsonpath={.metadata.uid}", check=False)).returncode == 0
             and d.stdout not in ("", uid), 60, "the Deployment re-created")

    # Scale subresource.
    kube.kubectl("scale", "inferenceservices.serving.forkless.dev/cnn-gpu", "--replicas=1", "-n", namespace)
    wait_for(lambda: kube.json("get", "deployment", "cnn-gpu", "-n", namespace)["spec"]["replicas"] == 1,
             60, "Deployment scaled to 1")


def test_unschedulable_is_surfaced_with_the_scheduler_message(
    kube: Kube, namespace: str, operator: subprocess.Popen[str], wait_for: Callable[..., Any]
) -> None:
    body = copy.deepcopy(example("cnn-gpu.yaml"))
    body["metadata"]["name"] = "too-big"
    body["spec"]["model"]["uri"] = "file:///models/resnet50.pt2"
    body["spec"]["replicas"] = 1
    body["spec"]["resources"]["gpus"] = 16  # more than any simulated node has
    body["spec"]["runtime"]["workers"] = 16
    kube.apply(body, namespace=namespace)
    condition = wait_for(lambda: (c := ready(kube, namespace, "too-big")) and c["reason"] == "Unschedulable" and c,
                         60, "too-big Unschedulable")
    assert condition["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in condition["message"]
