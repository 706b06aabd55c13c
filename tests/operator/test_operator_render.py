"""The renderers, by value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from forkless_operator.render import (
    render_children,
    render_deployment,
    render_hpa,
    render_pdb,
    render_service,
    shared_memory_size,
)
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(runtime_image="registry.test/forkless-runtime:1", default_tolerations=({"key": "team", "operator": "Exists"},))
LABELS = {
    "app.kubernetes.io/name": "forkless-runtime",
    "app.kubernetes.io/instance": "{name}",
    "app.kubernetes.io/component": "inference-server",
    "app.kubernetes.io/part-of": "forkless",
    "app.kubernetes.io/managed-by": "forkless-operator",
}


def example(name: str, namespace: str = "ml") -> InferenceService:
    body = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    body["metadata"].update(namespace=namespace, uid="uid-1", generation=1)
    return InferenceService.model_validate(body)


def isvc(**spec: Any) -> InferenceService:
    body = {"metadata": {"name": "m", "namespace": "ns", "uid": "u"}, "spec": {"model": {"uri": "file:///m.pt"}, **spec}}
    return InferenceService.model_validate(body)


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def labels(name: str) -> dict[str, str]:
    return {k: v.format(name=name) for k, v in LABELS.items()}


def test_cpu_example_deployment_env_and_command() -> None:
    deployment = render_deployment(example("mlp-cpu"), SETTINGS)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["forkless-runtime", "serve"]
    assert container["image"] == "registry.test/forkless-runtime:1"
    assert env_of(deployment) == {
        "FORKLESS_MODEL_NAME": "mlp",
        "FORKLESS_MODEL_URI": "file:///models/mlp.pt",
        "FORKLESS_SIGNATURE": '{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,16]}],'
                              '"outputs":[{"name":"scores","datatype":"FP32","shape":[-1,3]}]}',
        "FORKLESS_FORMAT": "torchscript",
        "FORKLESS_WORKERS": "2",
        "FORKLESS_START_METHOD": "spawn",
        "FORKLESS_DEVICE": "cpu",
        "FORKLESS_THREADS_PER_WORKER": "1",
        "FORKLESS_MAX_BATCH_SIZE": "16",
        "FORKLESS_MAX_BATCH_DELAY_MS": "2",
        "FORKLESS_MAX_QUEUE": "256",
        "FORKLESS_REQUEST_TIMEOUT_S": "30",
        "FORKLESS_DRAIN_DELAY_S": "5",
        "FORKLESS_HOST": "0.0.0.0",
        "FORKLESS_PORT": "8080",
        "FORKLESS_GRPC_PORT": "8081",
        "FORKLESS_LOG_FORMAT": "json",
    }
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "grpc", "containerPort": 8081, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The drain delay (5 s) and the runtime's grace period (30 s) must both pass before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15
    assert pod["tolerations"] == [{"key": "team", "operator": "Exists"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


def test_metadata_selector_and_owner() -> None:
    deployment = render_deployment(example("mlp-cpu"), SETTINGS)
    assert deployment["metadata"] == {
        "name": "mlp-cpu",
        "namespace": "ml",
        "labels": labels("mlp-cpu"),
        "ownerReferences": [{
            "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService", "name": "mlp-cpu",
            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True,
        }],
    }
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"] == {"matchLabels": {
        "app.kubernetes.io/name": "forkless-runtime", "app.kubernetes.io/instance": "mlp-cpu"}}
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels("mlp-cpu")


def test_gpu_example_requests_gpus_tolerates_the_taint_and_mounts_the_pvc() -> None:
    deployment = render_deployment(example("cnn-gpu"), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"},
    }
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in container["volumeMounts"]
    env = env_of(deployment)
    assert env["FORKLESS_MODEL_URI"] == "file:///mnt/models/resnet50.pt2"
    assert env["FORKLESS_DEVICE"] == "cuda"
    assert env["FORKLESS_WORKERS"] == "4"
    assert env["FORKLESS_GPU_MEMORY_FRACTION"] == "0.45"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_gpu_resource_name_override() -> None:
    deployment = render_deployment(isvc(resources={"gpus": 1, "gpuResourceName": "nvidia.com/mig-1g.10gb"}), SETTINGS)
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"nvidia.com/mig-1g.10gb": "1"}, "limits": {"nvidia.com/mig-1g.10gb": "1"}}


def test_http_model_is_downloaded_by_an_init_container() -> None:
    deployment = render_deployment(example("autoscaled"), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "registry.test/forkless-runtime:1"
    assert init["command"] == ["forkless-runtime", "fetch", "https://models.example.com/mlp/model.onnx",
                               "/mnt/models", "--timeout-s", "1800"]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert init["resources"]["limits"] == {"memory": "1Gi"}
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/mnt/models"}]
    assert "env" not in init  # no credentials: none given
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert env_of(deployment)["FORKLESS_MODEL_URI"] == "file:///mnt/models/model.onnx"


def test_autoscaled_leaves_replicas_to_the_hpa() -> None:
    service = example("autoscaled")
    assert "replicas" not in render_deployment(service, SETTINGS)["spec"]
    hpa = render_hpa(service, SETTINGS)
    assert hpa is not None
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "autoscaled"},
        "minReplicas": 1,
        "maxReplicas": 4,
        "metrics": [{"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
    }
    pdb = render_pdb(service, SETTINGS)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1


def test_grpc_turned_off_leaves_no_port_and_tells_the_runtime() -> None:
    isvc = example("mlp-cpu")
    off = isvc.model_copy(update={"spec": isvc.spec.model_copy(update={
        "runtime": isvc.spec.runtime.model_copy(update={"grpc": False})})})
    assert [p["name"] for p in render_service(off, SETTINGS)["spec"]["ports"]] == ["http"]
    container = render_deployment(off, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert {"name": "FORKLESS_GRPC_PORT", "value": "0"} in container["env"]


def test_service() -> None:
    service = render_service(example("mlp-cpu"), SETTINGS)
    assert service["spec"] == {
        "type": "ClusterIP",
        "selector": {"app.kubernetes.io/name": "forkless-runtime", "app.kubernetes.io/instance": "mlp-cpu"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                  {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP",
                   "appProtocol": "kubernetes.io/h2c"}],
    }


def test_single_replica_has_no_pdb_or_hpa() -> None:
    children = render_children(example("mlp-cpu"), SETTINGS)
    assert children["HorizontalPodAutoscaler"] is None
    assert children["PodDisruptionBudget"] is None
    assert [(c["kind"], c["metadata"]["name"]) for c in children.values() if c] == [
        ("Deployment", "mlp-cpu"), ("Service", "mlp-cpu"), ("Service", "mlp-cpu-predictor")]
    assert children["PredictorService"]["spec"] == children["Service"]["spec"]  # KServe's name, the same pods


@pytest.mark.parametrize(
    ("resources", "workers", "size"),
    [({}, None, "1Gi"), ({}, 3, "3Gi"), ({"memory": "2Gi"}, 4, "2Gi"), ({"memory": "1500Mi"}, 2, "1500Mi"),
     ({"sharedMemory": "512Mi"}, 8, "512Mi"), ({"gpus": 2}, None, "2Gi"),
     # auto: sized for the most workers the pod could start, one per CPU of its request (or 8)
     ({"cpu": "3500m"}, "auto", "4Gi"), ({}, "auto", "8Gi"), ({"gpus": 2, "cpu": "1", "memory": "4Gi"}, "auto", "2Gi")],
)
def test_shared_memory_size(resources: dict[str, Any], workers: int | str | None, size: str) -> None:
    runtime = {} if workers is None else {"workers": workers}
    assert shared_memory_size(isvc(resources=resources, runtime=runtime)) == size


def test_user_env_scheduling_and_service_account() -> None:
    service = isvc(
        runtime={"env": [{"name": "HF_HOME", "value": "/tmp/hf"},
                         {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        scheduling={"nodeSelector": {"pool": "a"}, "tolerations": [{"key": "x", "operator": "Exists"}],
                    "priorityClassName": "high"},
        serviceAccountName="runner",
    )
    pod = render_deployment(service, Settings())["spec"]["template"]["spec"]
    env = pod["containers"][0]["env"]
    assert env[-2:] == [{"name": "HF_HOME", "value": "/tmp/hf"},
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    assert pod["nodeSelector"] == {"pool": "a"}
    assert pod["tolerations"] == [{"key": "x", "operator": "Exists"}]
    assert pod["priorityClassName"] == "high"
    assert pod["serviceAccountName"] == "runner"
    assert "automountServiceAccountToken" not in pod


def test_rendering_is_deterministic() -> None:
    assert render_children(example("cnn-gpu"), SETTINGS) == render_children(example("cnn-gpu"), SETTINGS)


def test_settings_from_env() -> None:
    settings = Settings.from_env({
        "FORKLESS_OPERATOR_RUNTIME_IMAGE": "img:2",
        "FORKLESS_OPERATOR_RUNTIME_USER": "2000",
        "FORKLESS_OPERATOR_DEFAULT_TOLERATIONS": '[{"key": "a", "operator": "Exists"}]',
    })
    assert settings.runtime_image == "img:2"
    assert settings.runtime_user == 2000
    assert settings.default_tolerations == ({"key": "a", "operator": "Exists"},)


def test_termination_grace_covers_the_drain_delay_and_the_grace_period() -> None:
    deployment = render_deployment(isvc(runtime={"drainDelaySeconds": 2.5, "gracePeriodSeconds": 60}), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 3 + 60 + 15
    env = env_of(deployment)
    assert (env["FORKLESS_DRAIN_DELAY_S"], env["FORKLESS_GRACE_PERIOD_S"]) == ("2.5", "60")


def test_a_model_cache_is_written_by_the_download_and_read_by_the_runtime() -> None:
    isvc = InferenceService.model_validate({
        "metadata": {"name": "cnn", "namespace": "ml", "uid": "u"},
        "spec": {"model": {"uri": "hf://acme/cnn:v2", "cache": {"claimName": "model-cache"}}},
    })
    pod = render_deployment(isvc, SETTINGS)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][-2:] == ["--cache", "/mnt/model-cache"]
    assert {"name": "model-cache", "mountPath": "/mnt/model-cache"} in init["volumeMounts"]
    runtime = pod["containers"][0]
    assert {"name": "model-cache", "mountPath": "/mnt/model-cache", "readOnly": True} in runtime["volumeMounts"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}} in pod["volumes"]
