"""Models from an S3 bucket, with KServe's Secret and ServiceAccount, in real pods on the real node:
the init container (forkless-runtime fetch, from the built runtime image) downloads from moto's S3
API server on this machine, the runtime serves what it fetched, and when the download or the load
fails the InferenceService says why (ModelDownloadFailed naming the 403, ModelLoadFailed with the
loader's message, a stalled server cut off at the timeout) instead of a bare CrashLoopBackOff.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO, Helm, Kube, RealNode, wait_for
from tests.realnode.conftest import install_operator, service_url
from tests.storage_servers import MotoS3, StalledServer

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(900)]

ISVC = "inferenceservices.serving.forkless.dev"
KSERVE_SAMPLE = REPO / "examples" / "kserve" / "s3-secret.yaml"
READY_TIMEOUT_S = 300


@dataclass
class Bucket:
    namespace: str
    s3: MotoS3
    models: Path


def node_ip(kube: Kube, node: str) -> str:
    addresses = kube.json("get", "node", node)["status"]["addresses"]
    return next(a["address"] for a in addresses if a["type"] == "InternalIP")


def kserve_secret(name: str, endpoint: str, key_id: str, secret: str) -> list[dict[str, Any]]:
    """KServe's S3 sample as a user adapts it: their endpoint (MinIO-style, over http) and keys."""
    sample_secret, sample_account = yaml.safe_load_all(KSERVE_SAMPLE.read_text())
    sample_secret["metadata"]["name"] = name
    sample_secret["metadata"]["annotations"].update({
        "serving.kserve.io/s3-endpoint": endpoint, "serving.kserve.io/s3-usehttps": "0",
        "serving.kserve.io/s3-region": "us-east-1"})
    sample_secret["stringData"] = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    sample_account["metadata"]["name"] = f"{name}-sa"
    sample_account["secrets"] = [{"name": name}]
    return [sample_secret, sample_account]


@pytest.fixture(scope="module")
def bucket(kube: Kube, real_node: RealNode, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    namespace = f"storage-{int(time.time()) % 100000}"
    release = "forkless-storage"
    models = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(models)], check=True)
    # Pods reach the host at the node's address: moto listens there.
    s3 = MotoS3(host=node_ip(kube, real_node.name)).start(bind="0.0.0.0")
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "forkless.test/scratch=true")
    try:
        install_operator(kube, helm, namespace, release)
        endpoint = f"{s3.host}:{s3.port}"
        kube.apply(*kserve_secret("mysecret", endpoint, s3.access_key_id, s3.secret_access_key),
                   *kserve_secret("wrongsecret", endpoint, s3.access_key_id, "not-the-secret"), namespace=namespace)
        yield Bucket(namespace, s3, models)
    finally:
        kube.kubectl("delete", ISVC, "--all", "-n", namespace, "--wait=true", "--timeout=90s", check=False)
        helm("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig, check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=90s", check=False)
        s3.stop()


def apply_isvc(kube: Kube, namespace: str, name: str, model: dict[str, Any], account: str = "mysecret-sa",
               runtime: dict[str, Any] | None = None, memory: str = "1Gi") -> float:
    kube.apply({
        "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": model, "serviceAccountName": account,
                 "runtime": {"workers": 1, "threadsPerWorker": 1, **(runtime or {})},
                 "resources": {"cpu": "100m", "memory": memory}, "scheduling": RealNode.scheduling()},
    })
    return time.monotonic()


def ready_condition(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    body = kube.json("get", ISVC, name, "-n", namespace)
    conditions = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
    return {**conditions.get("Ready", {}), "modelStatus": body.get("status", {}).get("modelStatus")}


def wait_reason(kube: Kube, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        ready = ready_condition(kube, namespace, name)
        return ready if ready.get("reason") == reason else None

    return wait_for(reached, READY_TIMEOUT_S, f"{name} Ready=False with reason {reason}")


def test_a_model_in_s3_with_kserves_secret_and_service_account_serves(kube: Kube, bucket: Bucket) -> None:
    import torch

    bucket.s3.put("mlp/1/model.pt", bucket.models / "mlp.pt")
    bucket.s3.put("mlp/config.pbtxt", b"name: 'mlp'\n")
    applied = apply_isvc(kube, bucket.namespace, "from-s3", {"name": "mlp", "uri": "s3://models/mlp"})
    wait_reason(kube, bucket.namespace, "from-s3", "Available")
    print(f"s3:// apply -> Ready on the real node: {time.monotonic() - applied:.1f} s")
    ready = ready_condition(kube, bucket.namespace, "from-s3")
    assert ready["modelStatus"]["states"] == {"activeModelState": "Loaded", "targetModelState": "Loaded"}
    (pod,) = kube.json("get", "pods", "-n", bucket.namespace, "-l", "app.kubernetes.io/instance=from-s3")["items"]
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    fetched = kube.kubectl("logs", "-n", bucket.namespace, pod["metadata"]["name"], "-c", "download-model").stdout
    assert "fetched 2 file(s)" in fetched, fetched
    rows = [[0.1 * i + j for i in range(16)] for j in range(2)]
    expected = torch.jit.load(str(bucket.models / "mlp.pt"))(torch.tensor(rows)).tolist()
    url = service_url(kube, bucket.namespace, "from-s3")
    response = httpx.post(f"{url}/v2/models/mlp/infer", timeout=30, json={
        "inputs": [{"name": "input-0", "shape": [2, 16], "datatype": "FP32", "data": [x for row in rows for x in row]}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == pytest.approx([x for row in expected for x in row], rel=1e-5, abs=1e-6)


def test_a_second_pod_takes_the_model_from_the_cache(kube: Kube, real_node: RealNode, bucket: Bucket,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("model-cache")
    cache.chmod(0o777)  # a local volume keeps its host directory's owner: the runtime user must write
    pv = f"model-cache-{bucket.namespace}"
    kube.apply(
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "local": {"path": str(cache)},
                  "claimRef": {"namespace": bucket.namespace, "name": "model-cache"},
                  "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                      {"key": "kubernetes.io/hostname", "operator": "In", "values": [real_node.name]}]}]}}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "model-cache", "namespace": bucket.namespace},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    )
    try:
        bucket.s3.put("cached/model.pt", bucket.models / "mlp.pt")
        model = {"name": "mlp", "uri": "s3://models/cached/model.pt", "cache": {"claimName": "model-cache"}}
        apply_isvc(kube, bucket.namespace, "cached", model)
        wait_reason(kube, bucket.namespace, "cached", "Available")

        def download_log() -> tuple[str, str]:
            (pod,) = [p for p in kube.json("get", "pods", "-n", bucket.namespace, "-l",
                                           "app.kubernetes.io/instance=cached")["items"]
                      if not p["metadata"].get("deletionTimestamp")]
            name = pod["metadata"]["name"]
            return name, kube.kubectl("logs", "-n", bucket.namespace, name, "-c", "download-model").stdout

        first, log = download_log()
        assert "fetched 1 file(s)" in log, log
        kube.kubectl("delete", "pod", "-n", bucket.namespace, first, "--wait=true", "--timeout=90s")

        def replacement_ready() -> bool:
            pods = kube.json("get", "pods", "-n", bucket.namespace, "-l", "app.kubernetes.io/instance=cached")["items"]
            return any(p["metadata"]["name"] != first and any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
                for p in pods)

        wait_for(replacement_ready, READY_TIMEOUT_S, "the replacement pod ready")
        second, log = download_log()
        assert second != first
        assert "in the cache /mnt/model-cache: nothing downloaded" in log, log
    finally:
        kube.kubectl("delete", ISVC, "cached", "-n", bucket.namespace, "--wait=true", "--timeout=90s", check=False)
        kube.kubectl("delete", "pvc", "model-cache", "-n", bucket.namespace, "--wait=false", check=False)
        kube.kubectl("delete", "pv", pv, "--wait=false", check=False)


def test_a_wrong_key_shows_model_download_failed_naming_the_403_with_one_event(kube: Kube, bucket: Bucket) -> None:
    bucket.s3.put("mlp/1/model.pt", bucket.models / "mlp.pt")
    applied = apply_isvc(kube, bucket.namespace, "wrong-key", {"uri": "s3://models/mlp"}, account="wrongsecret-sa")
    ready = wait_reason(kube, bucket.namespace, "wrong-key", "ModelDownloadFailed")
    print(f"wrong key: apply -> ModelDownloadFailed in {time.monotonic() - applied:.1f} s")
    assert ready["status"] == "False"
    assert "s3://models/mlp: access denied (403), check the credentials" in ready["message"], ready
    failure = ready["modelStatus"]["lastFailureInfo"]
    assert failure["reason"] == "ModelDownloadFailed" and failure["exitCode"] == 1
    assert "container download-model" in failure["location"]

    def retried_twice() -> bool:
        (pod,) = kube.json("get", "pods", "-n", bucket.namespace, "-l", "app.kubernetes.io/instance=wrong-key")["items"]
        return pod["status"]["initContainerStatuses"][0]["restartCount"] >= 2

    wait_for(retried_twice, 120, "the download retried by the kubelet twice")
    events = kube.json("get", "events", "-n", bucket.namespace, "--field-selector",
                       "involvedObject.name=wrong-key,reason=ModelDownloadFailed")["items"]
    assert len(events) == 1 and events[0]["type"] == "Warning" and events[0].get("count", 1) == 1, events


def test_a_corrupt_model_file_shows_model_load_failed_with_the_loaders_message(kube: Kube, bucket: Bucket) -> None:
    bucket.s3.put("corrupt/model.pt", b"PK\x03\x04 this is not a TorchScript archive" * 100)
    applied = apply_isvc(kube, bucket.namespace, "corrupt", {"uri": "s3://models/corrupt/model.pt"},
                         runtime={"maxLoadAttempts": 1})
    ready = wait_reason(kube, bucket.namespace, "corrupt", "ModelLoadFailed")
    print(f"corrupt file: apply -> ModelLoadFailed in {time.monotonic() - applied:.1f} s")
    assert "the model cannot be loaded" in ready["message"], ready
    assert "/mnt/models/model.pt is not a TorchScript archive" in ready["message"], ready
    assert ready["modelStatus"]["transitionStatus"] == "BlockedByFailedLoad"


def test_a_model_that_does_not_fit_its_memory_limit_shows_model_out_of_memory(kube: Kube, bucket: Bucket) -> None:
    """The kernel's OOM killer, for real: 200Mi cannot hold a worker that imports torch."""
    bucket.s3.put("mlp/1/model.pt", bucket.models / "mlp.pt")
    apply_isvc(kube, bucket.namespace, "too-small", {"uri": "s3://models/mlp/1/model.pt"},
               runtime={"maxLoadAttempts": 1}, memory="200Mi")
    ready = wait_reason(kube, bucket.namespace, "too-small", "ModelOutOfMemory")
    assert "out of memory" in ready["message"] or "OOMKilled" in ready["message"], ready
    assert ready["modelStatus"]["lastFailureInfo"]["reason"] == "ModelOutOfMemory"


def test_a_stalled_download_ends_at_its_timeout(kube: Kube, real_node: RealNode, bucket: Bucket) -> None:
    stalled = StalledServer(host=node_ip(kube, real_node.name)).start(bind="0.0.0.0")
    try:
        applied = apply_isvc(kube, bucket.namespace, "stalled", {"uri": stalled.url, "downloadTimeoutSeconds": 2})
        ready = wait_reason(kube, bucket.namespace, "stalled", "ModelDownloadFailed")
        print(f"stalled server: apply -> ModelDownloadFailed in {time.monotonic() - applied:.1f} s")
    finally:
        stalled.stop()
    assert "the download did not finish within 2s (model.downloadTimeoutSeconds)" in ready["message"], ready


def test_auto_workers_int8_and_the_warm_up_in_a_pod_follow_its_limits(kube: Kube, bucket: Bucket) -> None:
    """In a container the runtime sizes --workers auto from the pod's memory limit (cgroup), not the
    node's memory, warms up at the largest batch, and serves int8 within the measured error."""
    import torch

    bucket.s3.put("mlp/1/model.pt", bucket.models / "mlp.pt")
    apply_isvc(kube, bucket.namespace, "auto-int8", {"name": "mlp", "uri": "s3://models/mlp/1/model.pt",
                                                      "inputShapes": [[16]]},
               runtime={"workers": "auto", "precision": "int8", "batching": {"maxBatchSize": 16}}, memory="1Gi")
    wait_reason(kube, bucket.namespace, "auto-int8", "Available")
    url = service_url(kube, bucket.namespace, "auto-int8")
    parameters = httpx.get(f"{url}/v2/models/mlp", timeout=30).json()["parameters"]
    print(f"in the pod: {parameters['workers_auto']}; warm-up {parameters['warm_up']}")
    assert "of 1.0 GiB" in parameters["workers_auto"], parameters  # the pod's limit, not the node's memory
    assert parameters["workers"] == 1 and "the memory fits 1" in parameters["workers_auto"]
    assert parameters["warm_up"]["batch"] == 16 and parameters["precision"] == "int8"
    rows = [[0.1 * i - j for i in range(16)] for j in range(3)]
    expected = torch.jit.load(str(bucket.models / "mlp.pt"))(torch.tensor(rows))
    response = httpx.post(f"{url}/v2/models/mlp/infer", timeout=30, json={
        "inputs": [{"name": "input-0", "shape": [3, 16], "datatype": "FP32", "data": [x for row in rows for x in row]}]})
    assert response.status_code == 200, response.text
    got = torch.tensor(response.json()["outputs"][0]["data"]).reshape(3, 3)
    assert (got - expected).abs().max() <= 0.025 * expected.abs().max() + 1e-3
