"""`forkless-operator convert`: KServe InferenceServices in, forkless ones out, every loss named.

The ten manifests in kserve_samples/ are the samples KServe's own docs give (described in
../shared/notes/kserve-migration.md); the cluster test dry-runs the converted ones against the
local API server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from forkless_operator.convert import convert
from forkless_operator.render import render_deployment
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService

SAMPLES = Path(__file__).parent / "kserve_samples"
CLI = [sys.executable, "-m", "forkless_operator.cli", "convert"]

# What becomes of each sample: "complete" carries every field, "partial" converts with named losses,
# "refused" names why it cannot.
OUTCOMES = {
    "01-torchserve-v1.yaml": ("refused", "KServe's pytorch format is TorchServe (.mar archives)"),
    "02-torchserve-v2-gpu.yaml": ("refused", "KServe's pytorch format is TorchServe"),
    "03-triton-torchscript.yaml": ("complete", ""),
    "04-onnx.yaml": ("complete", ""),
    "05-custom-predictor.yaml": ("refused", "model.format: kserve, model.handler: module:Class"),
    "06-canary.yaml": ("refused", "scikit-learn models are not served"),
    "07-kpa-concurrency-gpu.yaml": ("refused", "TensorFlow SavedModels are not served"),
    "08-hpa-standard.yaml": ("refused", "scikit-learn models are not served"),
    "09-s3-credentials.yaml": ("refused", "TensorFlow SavedModels are not served"),
    "10-huggingface.yaml": ("refused", "forkless has no LLM engine"),
}


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_each_kserve_sample_converts_or_says_why_not(name: str) -> None:
    outcome, reason = OUTCOMES[name]
    result = convert(yaml.safe_load((SAMPLES / name).read_text()))
    assert result.complete == (outcome == "complete"), result.lost
    if outcome != "complete":
        assert any(reason in line for line in result.lost), result.lost
    assert (result.manifest is not None) == (outcome != "refused")


def test_the_triton_sample_becomes_a_repository_with_its_thread_budget() -> None:
    result = convert(yaml.safe_load((SAMPLES / "03-triton-torchscript.yaml").read_text()))
    assert result.manifest is not None
    assert result.manifest["spec"]["model"] == {"uri": "gs://kfserving-examples/models/torchscript", "repository": True}
    assert result.manifest["spec"]["runtime"] == {"threadsPerWorker": 1}
    assert result.manifest["spec"]["resources"] == {"cpu": "1", "memory": "2Gi"}
    # KServe's CPU limit stays a limit: the runtime sizes its threads from the container's quota.
    assert result.manifest["spec"]["podTemplate"] == {"spec": {"containers": [
        {"name": "runtime", "resources": {"limits": {"cpu": "1"}}}]}}


def test_the_onnx_samples_requests_below_its_limits_stay_so_through_the_pod_template() -> None:
    result = convert(yaml.safe_load((SAMPLES / "04-onnx.yaml").read_text()))
    assert result.manifest is not None
    service = InferenceService.model_validate({**result.manifest, "metadata": {"name": "s", "namespace": "n"}})
    (container,) = render_deployment(service, Settings(runtime_image="r:1"))["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "512Mi"},
                                      "limits": {"cpu": "1", "memory": "1Gi"}}


def test_pod_fields_of_the_predictor_reach_the_pod_template() -> None:
    body = yaml.safe_load(FULL)
    predictor = body["spec"]["predictor"]
    predictor.update(labels={"team": "vision", "app.kubernetes.io/name": "x"}, annotations={"a": "b"},
                     imagePullSecrets=[{"name": "regcred"}], runtimeClassName="nvidia",
                     volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "model", "emptyDir": {}}])
    predictor["model"]["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    predictor["model"]["resources"]["limits"]["ephemeral-storage"] = "5Gi"
    result = convert(body)
    assert result.manifest is not None
    assert result.manifest["spec"]["podTemplate"] == {
        "metadata": {"labels": {"team": "vision"}, "annotations": {"a": "b"}},
        "spec": {"imagePullSecrets": [{"name": "regcred"}], "runtimeClassName": "nvidia",
                 "volumes": [{"name": "scratch", "emptyDir": {}}],
                 "containers": [{"name": "runtime", "resources": {"limits": {"ephemeral-storage": "5Gi"}},
                                 "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]}}
    assert sorted(result.lost) == ["spec.predictor.labels.app.kubernetes.io/name: app.kubernetes.io/ labels are the "
                                   "operator's",
                                   "spec.predictor.volumes.model: the volume name is the operator's; rename it"]


FULL = """
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: resnet
  namespace: vision
  labels: {team: vision}
  annotations:
    serving.kserve.io/deploymentMode: Standard
    example.com/owner: alice
spec:
  predictor:
    minReplicas: 2
    maxReplicas: 6
    scaleMetric: cpu
    scaleTarget: 60
    timeout: 30
    serviceAccountName: models
    nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: [{key: dedicated, operator: Equal, value: inference, effect: NoSchedule}]
    batcher: {maxBatchSize: 16, maxLatency: 5}
    model:
      modelFormat: {name: onnx}
      protocolVersion: grpc-v2
      storageUri: pvc://models/resnet/model.onnx
      env: [{name: LOG_EVERY, value: "100"}]
      resources:
        requests: {cpu: "4", memory: 8Gi, nvidia.com/gpu: "1"}
        limits: {memory: 8Gi, nvidia.com/gpu: "1"}
"""


def test_a_manifest_within_what_forkless_serves_converts_completely() -> None:
    result = convert(yaml.safe_load(FULL))
    assert result.lost == [] and result.complete
    assert result.manifest == {
        "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "resnet", "namespace": "vision", "labels": {"team": "vision"},
                     "annotations": {"example.com/owner": "alice"}},
        "spec": {
            "model": {"uri": "pvc://models/resnet/model.onnx", "format": "onnx"},
            "runtime": {"env": [{"name": "LOG_EVERY", "value": "100"}],
                        "batching": {"maxBatchSize": 16, "maxDelayMs": 5.0},
                        "requestTimeoutSeconds": 30.0, "grpc": True},
            "resources": {"cpu": "4", "memory": "8Gi", "gpus": 1},
            "scheduling": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                           "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference",
                                            "effect": "NoSchedule"}]},
            "serviceAccountName": "models",
            "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilization": 60},
        },
    }
    InferenceService.model_validate(result.manifest)


def test_fields_forkless_cannot_carry_are_each_named() -> None:
    body = yaml.safe_load(FULL)
    body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"
    predictor = body["spec"]["predictor"]
    predictor.update(minReplicas=0, scaleMetric="rps", logger={"mode": "all"})
    predictor["model"].update(ports=[{"containerPort": 9000}], stdin=True)
    predictor["model"]["env"].append({"name": "FORKLESS_MAX_QUEUE", "value": "1"})
    body["spec"]["transformer"] = {"containers": []}
    lost = "\n".join(convert(body).lost)
    for expected in ("deploymentMode: Serverless: no Knative", "minReplicas: 0 (scale to zero)",
                     "scaleMetric: rps is not scaled on", "spec.predictor.logger: no payload logger",
                     "spec.predictor.model.ports: ports are the operator's", "spec.predictor.model.stdin: not carried",
                     "FORKLESS_MAX_QUEUE: FORKLESS_* names are the runtime's",
                     "spec.transformer: forkless serves the predictor only"):
        assert expected in lost, lost


def test_the_command_reads_files_and_stdin_and_says_by_its_exit_code_whether_all_carried(tmp_path: Path) -> None:
    full = tmp_path / "full.yaml"
    full.write_text(FULL)
    complete = subprocess.run([*CLI, "-f", str(full)], capture_output=True, text=True)
    assert complete.returncode == 0, complete.stderr
    assert yaml.safe_load(complete.stdout)["metadata"]["name"] == "resnet"
    assert "converted 1 of 1 InferenceService(s) completely" in complete.stderr
    every = subprocess.run([*CLI, "-f", "-"], input="---\n".join(p.read_text() for p in sorted(SAMPLES.glob("*.yaml"))),
                           capture_output=True, text=True)
    assert every.returncode == 3
    assert len(list(yaml.safe_load_all(every.stdout))) == 2
    assert "converted 2 of 10 InferenceService(s) completely; 0 with fields not carried, 8 not at all" in every.stderr
    assert "torchserve: spec.predictor.model.modelFormat: pytorch" in every.stderr
    broken = subprocess.run([*CLI, "-f", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert broken.returncode == 2 and "missing.yaml" in broken.stderr


def test_kserves_concurrency_scaling_becomes_in_flight_requests_through_keda() -> None:
    body = yaml.safe_load(FULL)
    body["spec"]["predictor"].update(scaleMetric="concurrency", scaleTarget=2)
    result = convert(body)
    assert result.complete, result.lost
    assert result.manifest is not None
    assert result.manifest["spec"]["autoscaling"] == {"class": "keda", "metric": "inFlight", "target": 2.0,
                                                      "minReplicas": 2, "maxReplicas": 6}
    body["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] = "external"
    assert convert(body).manifest["spec"]["autoscaling"] == {"class": "external", "minReplicas": 2,
                                                             "maxReplicas": 6}
