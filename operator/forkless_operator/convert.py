"""`forkless-operator convert`: KServe `serving.kserve.io/v1beta1` InferenceServices into forkless ones.

A pure function per manifest: what carries over is carried, and every field that cannot be is named
with the reason (never dropped silently); the caller prints those and sets the exit code. The result
is validated by the same pydantic models the CRD is generated from, so what comes out is an object
the API server takes. What maps to what: docs/kserve-migration.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forkless_runtime.settings import ENV_PREFIX

from forkless_operator.spec import (
    API_VERSION,
    KIND,
    OPERATOR_VOLUMES,
    RUNTIME_CONTAINER_NAME,
    InferenceService,
)

KSERVE_API = "serving.kserve.io/v1beta1"
# KServe's model formats -> forkless's (None: the runtime loads it by its file; "repository": a Triton repository).
FORMATS: dict[str, str] = {"onnx": "onnx", "triton": "repository"}
UNSUPPORTED_FORMATS = {
    "pytorch": "KServe's pytorch format is TorchServe (.mar archives): re-export the model as TorchScript, "
               "torch.export (.pt2) or ONNX, or serve its handler as format python",
    "sklearn": "scikit-learn models are not served: convert the model to ONNX (skl2onnx)",
    "xgboost": "XGBoost models are not served: convert the model to ONNX (onnxmltools)",
    "lightgbm": "LightGBM models are not served: convert the model to ONNX (onnxmltools)",
    "tensorflow": "TensorFlow SavedModels are not served: convert the model to ONNX (tf2onnx)",
    "huggingface": "forkless has no LLM engine: serve the model with a Python handler",
    "pmml": "PMML models are not served",
    "paddle": "Paddle models are not served: convert the model to ONNX (paddle2onnx)",
}
URI_SCHEMES = ("s3://", "gs://", "hf://", "https://", "http://", "pvc://", "file://")
# Annotations that steer KServe's controller; what forkless makes of each (None: carried, needs no word).
KSERVE_ANNOTATIONS: dict[str, str | None] = {
    "serving.kserve.io/deploymentMode": None,  # checked below: Standard is what forkless does
    "serving.kserve.io/autoscalerClass": None,  # checked below
    "serving.kserve.io/enable-prometheus-scraping": "forkless serves /metrics on port http; a PodMonitor or "
                                                    "ServiceMonitor (the chart's, off by default) scrapes it",
    "serving.kserve.io/stop": "use spec.replicas: 0",
}
# Pod fields of the predictor that spec.podTemplate carries as they are.
POD_FIELDS = ("imagePullSecrets", "volumes", "initContainers", "securityContext", "runtimeClassName")
CARRIED_PREDICTOR_KEYS = {"model", "minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "timeout", "batcher",
                          "nodeSelector", "tolerations", "affinity", "priorityClassName", "topologySpreadConstraints",
                          "serviceAccountName", "labels", "annotations", *POD_FIELDS, *FORMATS, *UNSUPPORTED_FORMATS}
# The model container's fields: carried into spec or the runtime entry of spec.podTemplate, or refused below.
CARRIED_CONTAINER_KEYS = {"modelFormat", "storageUri", "runtime", "protocolVersion", "env", "resources", "name",
                          "volumeMounts", "envFrom", "securityContext", "lifecycle"}
REASONS: dict[str, str] = {
    "containers": "a custom predictor container is not run as it is: build its image on the runtime's with kserve "
                  "installed (examples/kserve/custom-predictor/Containerfile) and serve the class unmodified with "
                  "model.format: kserve, model.handler: module:Class, runtime.image",
    "canaryTrafficPercent": "no traffic split: run the canary as a second InferenceService",
    "logger": "no payload logger",
    "containerConcurrency": "no hard concurrency limit: runtime.maxQueue bounds waiting requests (503 beyond)",
    "deploymentStrategy": "the rollout strategy is fixed (GPU: surge 0, unavailable 1; CPU: 25 %, 0)",
    "workerSpec": "multi-node tensor or pipeline parallelism is not served",
    "scaleMetricType": "the metric type follows spec.autoscaling.metric (Utilization for cpu, AverageValue else)",
    "autoScaling": "KServe's metric list is not read: spec.autoscaling scales on cpu, queueDepth or inFlight",
    "storageUris": "one model location only (spec.model.uri)",
    "storage": "the storage-config Secret is not read: give the model's URI and credentials as KServe's "
               "storageUri and service account do",
}


@dataclass
class Conversion:
    name: str
    manifest: dict[str, Any] | None = None
    lost: list[str] = field(default_factory=list)  # "path: why", each a field that did not carry

    @property
    def complete(self) -> bool:
        return self.manifest is not None and not self.lost


def convert(kserve: dict[str, Any]) -> Conversion:
    """One KServe InferenceService -> a forkless one, and what could not be carried."""
    metadata = kserve.get("metadata") or {}
    result = Conversion(str(metadata.get("name", "?")))
    if kserve.get("apiVersion") != KSERVE_API or kserve.get("kind") != "InferenceService":
        result.lost.append(f"{kserve.get('apiVersion')}/{kserve.get('kind')}: not a KServe v1beta1 InferenceService")
        return result
    spec = kserve.get("spec") or {}
    for component in ("transformer", "explainer"):
        if component in spec:
            result.lost.append(f"spec.{component}: forkless serves the predictor only")
    for key in spec:
        if key not in ("predictor", "transformer", "explainer"):
            result.lost.append(f"spec.{key}: {REASONS.get(key, 'not carried')}")
    predictor = spec.get("predictor") or {}
    lost = result.lost
    pod_template: dict[str, Any] = {}
    model, runtime, resources, scheduling = _model(predictor, lost), _runtime(predictor, lost), \
        _resources(predictor, pod_template, lost), _scheduling(predictor)
    _pod(predictor, pod_template, lost)
    out_spec: dict[str, Any] = {"model": model, **({"runtime": runtime} if runtime else {}), "resources": resources}
    if scheduling:
        out_spec["scheduling"] = scheduling
    if pod_template:
        out_spec["podTemplate"] = pod_template
    if predictor.get("serviceAccountName"):
        out_spec["serviceAccountName"] = predictor["serviceAccountName"]
    out_spec.update(_replicas(predictor, metadata.get("annotations") or {}, lost))
    for key in predictor:
        if key not in CARRIED_PREDICTOR_KEYS:
            lost.append(f"spec.predictor.{key}: {REASONS.get(key, 'not carried')}")
    out_metadata = {key: metadata[key] for key in ("name", "namespace") if key in metadata}
    if metadata.get("labels"):
        out_metadata["labels"] = dict(metadata["labels"])
    annotations = _annotations(metadata.get("annotations") or {}, lost)
    if annotations:
        out_metadata["annotations"] = annotations
    if model.get("uri") is None:
        return result
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": out_metadata, "spec": out_spec}
    try:
        InferenceService.model_validate({**manifest, "metadata": {"namespace": "default", **out_metadata}})
    except ValueError as error:  # a value KServe took that forkless's rules refuse: say which
        lost.append(f"spec: the converted object is refused: {error}")
        return result
    result.manifest = manifest
    return result


def _model_block(predictor: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, str]:
    """(block, format name, its path): the new `model:` form, or a legacy framework key (`pytorch:`, `onnx:`, ...)."""
    source = predictor.get("model")
    if source is not None:
        format_name = ((source.get("modelFormat") or {}).get("name") or "").lower()
        if format_name == "pytorch" and "triton" in str(source.get("runtime", "")):
            format_name = "triton"  # TorchScript in a Triton repository, served by KServe's Triton runtime
        return source, format_name, "spec.predictor.model"
    for key in (*FORMATS, *UNSUPPORTED_FORMATS):
        if key in predictor:
            return predictor[key], key, f"spec.predictor.{key}"
    return None, None, "spec.predictor.model"


def _model(predictor: dict[str, Any], lost: list[str]) -> dict[str, Any]:
    source, format_name, path = _model_block(predictor)
    model: dict[str, Any] = {}
    if source is None:
        lost.append("spec.predictor: no model (model.storageUri or a framework block) to convert")
        return model
    if format_name in UNSUPPORTED_FORMATS:
        lost.append(f"{path}.modelFormat: {format_name}: {UNSUPPORTED_FORMATS[format_name]}")
        return model
    if format_name and format_name not in FORMATS:
        lost.append(f"{path}.modelFormat: {format_name} is not served (torchscript, torch-export, onnx or python)")
        return model
    uri = source.get("storageUri")
    if not uri:
        lost.append(f"{path}.storageUri: missing; forkless needs the model's location")
        return model
    if not uri.startswith(URI_SCHEMES):
        lost.append(f"{path}.storageUri: {uri.split('://')[0]}:// is not read (s3, gs, hf, http(s), pvc, file)")
        return model
    model["uri"] = uri
    if format_name == "triton":
        model["repository"] = True  # <name>/config.pbtxt and <name>/<version>/model.*, every model served
    elif format_name:
        model["format"] = FORMATS[format_name]
    runtime = str(source.get("runtime", ""))
    if runtime and "triton" not in runtime:
        lost.append(f"{path}.runtime: {runtime}: one runtime serves every model (spec.runtime.image)")
    for key in source:
        if key not in CARRIED_CONTAINER_KEYS and key not in LOST_CONTAINER_KEYS:
            lost.append(f"{path}.{key}: not carried")
    for key, reason in LOST_CONTAINER_KEYS.items():
        if key in source:
            lost.append(f"{path}.{key}: {reason}")
    if source.get("protocolVersion") == "grpc-v1":
        lost.append(f"{path}.protocolVersion: grpc-v1 is not served (V1 over HTTP, V2 over HTTP and gRPC)")
    return model


# The model container's fields the operator owns, and why.
LOST_CONTAINER_KEYS = dict((
                        ("runtimeVersion", "the runtime image is spec.runtime.image"),
                        ("args", "the runtime's command is the operator's; its settings are spec.runtime fields"),
                        ("command", "the runtime's command is the operator's"),
                        ("ports", "ports are the operator's: 8080 HTTP, 8081 gRPC"),
                        ("readinessProbe", "probes are the operator's"),
                        ("livenessProbe", "probes are the operator's"),
                        ("image", "use spec.runtime.image (an image built on the runtime's)"),
                        ("workingDir", "the runtime's command is the operator's"),
                        ("startupProbe", "probes are the operator's")))


def _runtime(predictor: dict[str, Any], lost: list[str]) -> dict[str, Any]:
    runtime: dict[str, Any] = {}
    source = _model_block(predictor)[0] or {}
    env = []
    for variable in source.get("env") or []:
        name = variable.get("name", "")
        if name == "OMP_NUM_THREADS" and str(variable.get("value", "")).isdigit():
            runtime["threadsPerWorker"] = max(1, int(variable["value"]))  # what KServe users set it for
        elif name.startswith(ENV_PREFIX):
            lost.append(f"spec.predictor.model.env.{name}: FORKLESS_* names are the runtime's settings")
        else:
            env.append({k: v for k, v in variable.items() if k in ("name", "value", "valueFrom")})
    if env:
        runtime["env"] = env
    timeout = predictor.get("timeout")
    batcher = predictor.get("batcher")
    if batcher is not None:
        batching: dict[str, Any] = {}
        if batcher.get("maxBatchSize") is not None:
            batching["maxBatchSize"] = int(batcher["maxBatchSize"])
        if batcher.get("maxLatency") is not None:
            batching["maxDelayMs"] = float(batcher["maxLatency"])
        runtime["batching"] = batching or {"maxBatchSize": 32, "maxDelayMs": 5000.0}  # KServe's batcher defaults
        timeout = timeout if timeout is not None else batcher.get("timeout")
    if timeout is not None:
        runtime["requestTimeoutSeconds"] = float(timeout)
    if source.get("protocolVersion") == "grpc-v2":
        runtime["grpc"] = True
    return runtime


def _resources(predictor: dict[str, Any], pod_template: dict[str, Any], lost: list[str]) -> dict[str, Any]:
    """CPU request, memory and GPUs into spec.resources; a CPU limit, a memory request below the limit
    and any other resource (ephemeral-storage) into the runtime entry of the pod template."""
    source = _model_block(predictor)[0] or {}
    resources = source.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    out: dict[str, Any] = {}
    extra: dict[str, dict[str, Any]] = {"limits": {}, "requests": {}}
    if "cpu" in requests or "cpu" in limits:
        out["cpu"] = requests.get("cpu", limits.get("cpu"))
    if "cpu" in limits:
        extra["limits"]["cpu"] = limits["cpu"]
    memory = limits.get("memory", requests.get("memory"))
    if memory is not None:
        out["memory"] = memory
        if "memory" in requests and "memory" in limits and requests["memory"] != limits["memory"]:
            extra["requests"]["memory"] = requests["memory"]
    gpu_keys = [k for k in {**requests, **limits} if "gpu" in k or k.startswith("nvidia.com/")]
    for key in gpu_keys:
        out["gpus"] = int(limits.get(key) or requests.get(key) or 0)
        if key != "nvidia.com/gpu":
            out["gpuResourceName"] = key
    for kind, quantities in (("requests", requests), ("limits", limits)):
        for key, value in quantities.items():
            if key not in ("cpu", "memory") and key not in gpu_keys:
                extra[kind][key] = value
    extra = {kind: quantities for kind, quantities in extra.items() if quantities}
    if extra:
        _runtime_entry(pod_template)["resources"] = extra
    return out


def _runtime_entry(pod_template: dict[str, Any]) -> dict[str, Any]:
    containers = pod_template.setdefault("spec", {}).setdefault("containers", [])
    if not containers:
        containers.append({"name": RUNTIME_CONTAINER_NAME})
    entry: dict[str, Any] = containers[0]
    return entry


def _pod(predictor: dict[str, Any], pod_template: dict[str, Any], lost: list[str]) -> None:
    """The predictor's pod fields, labels and annotations, and its container's mounts and security
    context, into spec.podTemplate; what the operator owns there is named instead."""
    metadata: dict[str, Any] = {}
    labels = {k: v for k, v in (predictor.get("labels") or {}).items() if not k.startswith("app.kubernetes.io/")}
    for key in set(predictor.get("labels") or {}) - set(labels):
        lost.append(f"spec.predictor.labels.{key}: app.kubernetes.io/ labels are the operator's")
    if labels:
        metadata["labels"] = labels
    if predictor.get("annotations"):
        metadata["annotations"] = dict(predictor["annotations"])
    if metadata:
        pod_template["metadata"] = metadata
    for key in POD_FIELDS:
        value = predictor.get(key)
        if not value:
            continue
        if key == "volumes":
            value = [v for v in value if v.get("name") not in OPERATOR_VOLUMES]
            for volume in set(v.get("name") for v in predictor["volumes"]) & set(OPERATOR_VOLUMES):
                lost.append(f"spec.predictor.volumes.{volume}: the volume name is the operator's; rename it")
        if value:
            pod_template.setdefault("spec", {})[key] = value
    source = _model_block(predictor)[0] or {}
    for key in ("volumeMounts", "envFrom", "securityContext", "lifecycle"):
        value = source.get(key)
        if key == "volumeMounts" and value:
            value = [m for m in value if m.get("mountPath") != "/dev/shm"]
            if len(value) != len(source[key]):
                lost.append("spec.predictor.model.volumeMounts: /dev/shm is the operator's (resources.sharedMemory)")
        if value:
            _runtime_entry(pod_template)[key] = value


def _scheduling(predictor: dict[str, Any]) -> dict[str, Any]:
    return {key: predictor[key] for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName",
                                            "topologySpreadConstraints") if predictor.get(key)}


def _replicas(predictor: dict[str, Any], annotations: dict[str, str], lost: list[str]) -> dict[str, Any]:
    """replicas, or autoscaling where KServe would have scaled (maxReplicas above minReplicas): CPU under
    an HPA; concurrency (requests in flight per pod, as Knative counts it) through KEDA; an external
    autoscaler left alone."""
    low, high = predictor.get("minReplicas"), predictor.get("maxReplicas")
    if low == 0:
        lost.append("spec.predictor.minReplicas: 0 (scale to zero) is not served: at least 1 replica")
    low = max(1, int(low if low is not None else 1))
    metric = predictor.get("scaleMetric", "cpu")
    autoscaler = annotations.get("serving.kserve.io/autoscalerClass", "hpa")
    if autoscaler == "none" or high is None or int(high) <= low:
        return {"replicas": low}
    bounds = {"minReplicas": low, "maxReplicas": int(high)}
    if autoscaler == "external":
        return {"autoscaling": {"class": "external", **bounds}}
    if metric == "concurrency":
        target = float(predictor.get("scaleTarget", 8))
        return {"autoscaling": {"class": "keda", "metric": "inFlight", "target": target, **bounds}}
    if metric != "cpu":
        lost.append(f"spec.predictor.scaleMetric: {metric} is not scaled on (cpu, or concurrency as inFlight); "
                    f"{low} to {high} replicas on CPU instead")
    target = int(predictor.get("scaleTarget", 80)) if metric == "cpu" else 80
    return {"autoscaling": {**bounds, "targetCPUUtilization": target}}


def _annotations(annotations: dict[str, str], lost: list[str]) -> dict[str, str]:
    carried = {}
    for key, value in annotations.items():
        if key == "serving.kserve.io/deploymentMode":
            if value not in ("Standard", "RawDeployment"):
                lost.append(f"metadata.annotations.{key}: {value}: no Knative; forkless renders a Deployment and a "
                            "Service, as KServe's Standard mode does")
        elif key == "serving.kserve.io/autoscalerClass":
            if value not in ("hpa", "none", "external", "keda"):
                lost.append(f"metadata.annotations.{key}: {value}: not an autoscaler class forkless knows "
                            "(hpa, keda, external)")
        elif key in KSERVE_ANNOTATIONS:
            lost.append(f"metadata.annotations.{key}: {KSERVE_ANNOTATIONS[key]}")
        elif key == "kubectl.kubernetes.io/last-applied-configuration":
            continue
        else:
            carried[key] = value
    return carried
