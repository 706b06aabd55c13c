"""Pure renderers: an InferenceService in, the manifests of its children out.

No I/O and no clock: the same InferenceService and settings always give the same
dicts, which the operator server-side applies as they are. The runtime is
configured through FORKLESS_* environment variables (the runtime reads each
``--flag`` also from ``FORKLESS_<FLAG>``), so the container's command and env
are exactly what one runs locally to reproduce a pod.
"""

from __future__ import annotations

import json
import math
import posixpath
from decimal import Decimal
from typing import Any

from forkless_runtime.settings import (
    DEFAULTS,
    EXTENSION_FORMATS,
    FLAGS,
    env_name,
    env_value,
    format_input_shapes,
)
from forkless_runtime.storage.uris import parse_model_uri
from kubernetes.utils import parse_quantity

from forkless_operator import kinds
from forkless_operator.credentials import NO_CREDENTIALS, StorageCredentials
from forkless_operator.pod_template import apply_pod_template
from forkless_operator.settings import Settings, get_settings
from forkless_operator.spec import (
    API_VERSION,
    INIT_CONTAINER_NAMES,
    KIND,
    LOAD_METRICS,
    OPERATOR_DRAIN_DELAY_S,
    RUNTIME_CONTAINER_NAME,
    AutoscalingSpec,
    InferenceService,
)

HTTP_PORT = 8080
GRPC_PORT = 8081  # KServe's and the runtime's default
SERVICE_PORT = 80
MODEL_MOUNT_PATH = "/mnt/models"
# The cache volume, at the same path in the init container (writes) and the runtime (reads the links).
MODEL_CACHE_PATH = "/mnt/model-cache"
RUNTIME_CONTAINER = RUNTIME_CONTAINER_NAME  # the pod template merges its entry of this name
# Kubernetes waits this much longer than the runtime's drain delay and grace period together
# before SIGKILL, so that in-flight requests never die with the pod.
TERMINATION_MARGIN_S = 15
DEFAULT_GRACE_PERIOD_S: float = DEFAULTS["grace_period_s"]
# Large models take minutes to load; the startup probe holds liveness off for up to 30 minutes.
STARTUP_PROBE_PERIOD_S = 5
STARTUP_PROBE_FAILURES = 360
SHARED_MEMORY_PER_WORKER = 1 << 30  # 1Gi

DOWNLOAD_CONTAINER = INIT_CONTAINER_NAMES[0]  # the pod template may not take its name
# The init container streams to disk: its memory stays near 100Mi whatever the model's size (KServe's
# storage initializer is capped at 1Gi and runs out on models over 8 GB, kserve#5326).
DOWNLOAD_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
# Kubernetes keeps the container's last words (forkless_runtime.termination) or, failing that, its log's
# tail, in the pod's status, where the operator reads why a model cannot download or load.
TERMINATION_MESSAGE_POLICY = "FallbackToLogsOnError"


def selector_labels(isvc: InferenceService) -> dict[str, str]:
    """The Deployment's selector: immutable labels only, so it never has to change."""
    return {
        "app.kubernetes.io/name": "forkless-runtime",
        "app.kubernetes.io/instance": isvc.metadata.name,
    }


def labels(isvc: InferenceService) -> dict[str, str]:
    """Labels of every child and of the pods."""
    return {
        **selector_labels(isvc),
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/part-of": "forkless",
        "app.kubernetes.io/managed-by": "forkless-operator",
    }


def selector_string(isvc: InferenceService) -> str:
    """The selector as the scale subresource wants it (status.selector)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(isvc).items())


def service_url(isvc: InferenceService, settings: Settings | None = None, suffix: str = "") -> str:
    settings = settings or get_settings()
    return f"http://{isvc.metadata.name}{suffix}.{isvc.metadata.namespace}.svc.{settings.cluster_domain}"


def owner_reference(isvc: InferenceService) -> dict[str, Any]:
    """Makes the InferenceService the controller of a child: deleting it deletes the child."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": isvc.metadata.name,
        "uid": isvc.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(isvc: InferenceService) -> dict[str, Any]:
    return {
        "name": isvc.metadata.name,
        "namespace": isvc.metadata.namespace,
        "labels": labels(isvc),
        "ownerReferences": [owner_reference(isvc)],
    }


def _quantity(value: str | int) -> str:
    return str(value)


def _bytes_quantity(size: Decimal) -> str:
    """Bytes as a readable Quantity: 2Gi, 512Mi, or plain bytes."""
    size = size.to_integral_value()
    for suffix, factor in (("Gi", 1 << 30), ("Mi", 1 << 20)):
        if size % factor == 0:
            return f"{int(size // factor)}{suffix}"
    return str(int(size))


# With workers: auto the count is decided in the pod; /dev/shm is sized for this many per replica when
# neither GPUs nor a CPU request say more (a sizeLimit reserves nothing until it is used).
AUTO_WORKERS_ASSUMED = 8


def planned_workers(isvc: InferenceService) -> int:
    """The worker count to size for: the spec's, or with auto the most the runtime could start
    (one per usable CPU, and at least one per GPU)."""
    workers = isvc.spec.workers
    if isinstance(workers, int):
        return workers
    resources = isvc.spec.resources
    cpus = math.ceil(parse_quantity(resources.cpu)) if resources.cpu is not None else AUTO_WORKERS_ASSUMED
    return max(resources.gpus, cpus, 1)


def shared_memory_size(isvc: InferenceService) -> str:
    """sizeLimit of /dev/shm: as given, else 1Gi per worker, at most the memory request.

    A memory-backed emptyDir counts against the container's memory limit, so the
    default never exceeds it.
    """
    resources = isvc.spec.resources
    if resources.shared_memory is not None:
        return _quantity(resources.shared_memory)
    size = Decimal(SHARED_MEMORY_PER_WORKER * planned_workers(isvc))
    if resources.memory is not None:
        size = min(size, parse_quantity(resources.memory))
    return _bytes_quantity(size)


def model_source(
    isvc: InferenceService, credentials: StorageCredentials = NO_CREDENTIALS
) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """(uri the runtime loads, model volume or None, download init container or None).

    The runtime loads local paths only: a PVC is mounted read-only; an s3://, gs://, hf:// or
    http(s):// model is downloaded by ``forkless-runtime fetch`` into an emptyDir, and the runtime
    finds the model file in that directory.
    """
    model = isvc.spec.model
    location = parse_model_uri(model.uri)
    if location.scheme == "pvc":
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": location.container, "readOnly": True}}
        return f"file://{MODEL_MOUNT_PATH}/{location.path}", volume, None
    if location.downloaded:
        volume = {"name": "model", "emptyDir": {}}
        env = [*credentials.env]
        if location.scheme == "hf":  # huggingface_hub's cache and locks, beside the model (HOME may be read-only)
            env.append({"name": "HF_HOME", "value": f"{MODEL_MOUNT_PATH}/.hf-home"})
        command = ["forkless-runtime", "fetch", model.uri, MODEL_MOUNT_PATH,
                   "--timeout-s", str(model.download_timeout_seconds)]
        mounts = [{"name": "model", "mountPath": MODEL_MOUNT_PATH}]
        if model.cache is not None:
            command += ["--cache", MODEL_CACHE_PATH]
            mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_PATH})
        init: dict[str, Any] = {
            "name": DOWNLOAD_CONTAINER,
            "command": command,
            "resources": DOWNLOAD_RESOURCES,
            "terminationMessagePolicy": TERMINATION_MESSAGE_POLICY,
            "volumeMounts": [*mounts, *credentials.mounts],
        }
        if env:
            init["env"] = env
        # One object with a model's extension lands under its own name; a prefix or repository is a
        # directory the runtime looks into (forkless_runtime.storage.resolve).
        name = posixpath.basename(location.path.split("?", 1)[0])
        single = location.scheme != "hf" and posixpath.splitext(name)[1].lower() in EXTENSION_FORMATS
        return f"file://{MODEL_MOUNT_PATH}/{name}" if single else f"file://{MODEL_MOUNT_PATH}", volume, init
    return model.uri, None, None


# Where every forkless-runtime setting comes from: a field of the spec, or the operator itself.
# tests/operator/test_contract.py holds this to the runtime's settings table in both directions,
# renders every field through the runtime's own parser, and docs/operator.md shows it.
RUNTIME_SETTING_SOURCES: dict[str, str] = {
    "model_name": "spec.model.name (default metadata.name; none for a repository)",
    "model_uri": "spec.model.uri (a pvc:// model becomes the mounted path, a downloaded one the file or directory it lands in)",
    "models": "operator: none (a repository names several models)",
    "model_repository": "spec.model.repository (the uri's path when true)",
    "signature": "spec.model.signature (as JSON)",
    "format": "spec.model.format",
    "handler": "spec.model.handler",
    "workers": "spec.runtime.workers (default one per GPU, else 1; auto decided in the pod)",
    "start_method": "spec.runtime.startMethod",
    "device": "operator: cuda when spec.resources.gpus > 0, else cpu",
    "threads_per_worker": "spec.runtime.threadsPerWorker",
    "gpu_memory_fraction": "spec.runtime.gpuMemoryFraction",
    "precision": "spec.runtime.precision",
    "input_shapes": "spec.model.inputShapes",
    "max_batch_size": "spec.runtime.batching.maxBatchSize (1, batching off, when spec.runtime.batching is omitted)",
    "max_batch_delay_ms": "spec.runtime.batching.maxDelayMs",
    "max_queue": "spec.runtime.maxQueue",
    "request_timeout_s": "spec.runtime.requestTimeoutSeconds",
    "grace_period_s": "spec.runtime.gracePeriodSeconds",
    "drain_delay_s": "spec.runtime.drainDelaySeconds (default 5: a pod keeps answering while its endpoints go)",
    "max_body_mb": "spec.runtime.maxBodyMegabytes",
    "max_load_attempts": "spec.runtime.maxLoadAttempts",
    "shm_threshold_kb": "spec.runtime.sharedMemoryThresholdKilobytes",
    "host": "operator: 0.0.0.0",
    "port": f"operator: {HTTP_PORT}, the container port the probes and the Service use",
    "grpc_port": f"spec.runtime.grpc ({GRPC_PORT}, the container and Service port named grpc; 0 when false)",
    "log_format": "spec.runtime.logFormat (default: the operator's FORKLESS_OPERATOR_LOG_FORMAT, the chart's defaults.runtimeLogFormat)",
    "log_level": "spec.runtime.logLevel",
    "access_log": "spec.runtime.accessLog",
}


def runtime_settings(isvc: InferenceService, settings: Settings | None = None) -> dict[str, Any]:
    """Every forkless-runtime setting (by its field in the runtime's table) for this InferenceService;
    None leaves the runtime's own default."""
    settings = settings or get_settings()
    spec, runtime = isvc.spec, isvc.spec.runtime
    uri, _, _ = model_source(isvc)
    batching = runtime.batching
    repository = spec.model.repository
    signature = spec.model.signature
    return {
        "model_name": None if repository else isvc.model_name,
        "model_uri": None if repository else uri,
        "models": None,
        "model_repository": uri.removeprefix("file://") if repository else None,
        "signature": json.dumps(signature.model_dump(mode="json"), separators=(",", ":")) if signature else None,
        "format": spec.model.format,
        "handler": spec.model.handler,
        "workers": spec.workers,
        "start_method": runtime.start_method,
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "threads_per_worker": runtime.threads_per_worker,
        "gpu_memory_fraction": runtime.gpu_memory_fraction,
        "precision": runtime.precision,
        "input_shapes": format_input_shapes(spec.model.input_shapes) if spec.model.input_shapes else None,
        "max_batch_size": batching.max_batch_size if batching else 1,
        "max_batch_delay_ms": batching.max_delay_ms if batching else None,
        "max_queue": runtime.max_queue,
        "request_timeout_s": runtime.request_timeout_seconds,
        "grace_period_s": runtime.grace_period_seconds,
        "drain_delay_s": drain_delay_s(isvc),
        "max_body_mb": runtime.max_body_megabytes,
        "max_load_attempts": runtime.max_load_attempts,
        "shm_threshold_kb": runtime.shared_memory_threshold_kilobytes,
        "host": "0.0.0.0",
        "port": HTTP_PORT,
        "grpc_port": GRPC_PORT if runtime.grpc else 0,
        "log_format": runtime.log_format or settings.log_format,
        "log_level": runtime.log_level,
        "access_log": runtime.access_log,
    }


def runtime_env(isvc: InferenceService, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The FORKLESS_* variables that configure ``forkless-runtime serve``, in the runtime's flag order,
    then the user's env."""
    values = runtime_settings(isvc, settings)
    env: list[dict[str, Any]] = [
        {"name": env_name(flag.field), "value": env_value(values[flag.field])}
        for flag in FLAGS
        if values[flag.field] is not None
    ]
    env += [e.model_dump(by_alias=True, exclude_none=True) for e in isvc.spec.runtime.env]
    return env


def container_ports(isvc: InferenceService) -> list[dict[str, Any]]:
    ports = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    if isvc.spec.runtime.grpc:
        ports.append({"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"})
    return ports


def service_ports(isvc: InferenceService) -> list[dict[str, Any]]:
    """http, and grpc (cleartext HTTP/2: `appProtocol` tells meshes and gateways so) unless turned off."""
    ports = [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]
    if isvc.spec.runtime.grpc:
        ports.append({"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                      "appProtocol": "kubernetes.io/h2c"})
    return ports


def drain_delay_s(isvc: InferenceService) -> float:
    delay = isvc.spec.runtime.drain_delay_seconds
    return OPERATOR_DRAIN_DELAY_S if delay is None else delay


def termination_grace_period_s(isvc: InferenceService) -> int:
    """Longer than the runtime's drain delay and grace period together: SIGKILL never cuts a request."""
    grace = isvc.spec.runtime.grace_period_seconds
    runtime_grace = DEFAULT_GRACE_PERIOD_S if grace is None else grace
    return math.ceil(drain_delay_s(isvc) + runtime_grace) + TERMINATION_MARGIN_S


def _http_probe(path: str, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def tolerations(isvc: InferenceService, settings: Settings) -> list[dict[str, Any]]:
    """The GPU taint's toleration when the pod asks for GPUs, the operator's defaults, then the user's."""
    result: list[dict[str, Any]] = []
    if isvc.spec.resources.gpus > 0:
        result.append({"key": settings.gpu_taint_key, "operator": "Exists", "effect": "NoSchedule"})
    result += [dict(t) for t in settings.default_tolerations]
    if isvc.spec.scheduling:
        result += [t for t in isvc.spec.scheduling.tolerations if t not in result]
    return result


def _container_resources(isvc: InferenceService, settings: Settings) -> dict[str, Any]:
    spec = isvc.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.cpu is not None:
        requests["cpu"] = _quantity(spec.cpu)  # no CPU limit: throttling would stall batches
    if spec.memory is not None:
        requests["memory"] = limits["memory"] = _quantity(spec.memory)
    if spec.gpus > 0:
        gpu = spec.gpu_resource_name or settings.gpu_resource_name
        requests[gpu] = limits[gpu] = str(spec.gpus)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def render_deployment(isvc: InferenceService, settings: Settings | None = None,
                      credentials: StorageCredentials = NO_CREDENTIALS) -> dict[str, Any]:
    """The Deployment of runtime pods; ``replicas`` is left out when an autoscaler owns it."""
    settings = settings or get_settings()
    spec = isvc.spec
    image = spec.runtime.image or settings.runtime_image
    _, model_volume, download = model_source(isvc, credentials)

    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    # PyTorch multiprocessing moves tensors through /dev/shm; the container default of 64Mi breaks it.
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory_size(isvc)}}
    ]
    if model_volume is not None:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT_PATH, "readOnly": True})
        volumes.append(model_volume)
    if download is not None:
        volumes += credentials.volumes
        cache = spec.model.cache
        if cache is not None:  # the model's files are links into the cache
            mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_PATH, "readOnly": True})
            volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}})

    container: dict[str, Any] = {
        "name": RUNTIME_CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["forkless-runtime", "serve"],
        "env": runtime_env(isvc, settings),
        "ports": container_ports(isvc),
        # Ready only once every worker has loaded the model: the startup probe uses readiness.
        "startupProbe": _http_probe("/v2/health/ready", STARTUP_PROBE_PERIOD_S, STARTUP_PROBE_FAILURES),
        "readinessProbe": _http_probe("/v2/health/ready", 5, 3),
        "livenessProbe": _http_probe("/v2/health/live", 10, 3),
        "resources": _container_resources(isvc, settings),
        "securityContext": _container_security_context(),
        "terminationMessagePolicy": TERMINATION_MESSAGE_POLICY,
        "volumeMounts": mounts,
    }

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": termination_grace_period_s(isvc),
        # Service links put variables of every Service in the namespace into the env; not wanted.
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.runtime_user,
            "runAsGroup": settings.runtime_user,
            "fsGroup": settings.runtime_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if download is not None:
        pod_spec["initContainers"] = [
            {
                **download,
                "image": image,
                "imagePullPolicy": settings.image_pull_policy,
                "securityContext": _container_security_context(),
            }
        ]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False  # the runtime never calls the API server
    pod_tolerations = tolerations(isvc, settings)
    if pod_tolerations:
        pod_spec["tolerations"] = pod_tolerations
    scheduling = spec.scheduling
    if scheduling is not None:
        if scheduling.node_selector:
            pod_spec["nodeSelector"] = dict(scheduling.node_selector)
        if scheduling.affinity:
            pod_spec["affinity"] = scheduling.affinity
        if scheduling.priority_class_name:
            pod_spec["priorityClassName"] = scheduling.priority_class_name
        if scheduling.topology_spread_constraints:
            pod_spec["topologySpreadConstraints"] = scheduling.topology_spread_constraints

    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(isvc)},
        "revisionHistoryLimit": 3,
        "strategy": _strategy(isvc),
        "template": apply_pod_template({"metadata": {"labels": labels(isvc)}, "spec": pod_spec}, spec.pod_template,
                                       RUNTIME_CONTAINER),
    }
    if spec.autoscaling is None:
        deployment_spec = {"replicas": desired_replicas(isvc), **deployment_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(isvc), "spec": deployment_spec}


def desired_replicas(isvc: InferenceService) -> int:
    """Replicas without an autoscaler: spec.replicas, 1 when omitted."""
    return 1 if isvc.spec.replicas is None else isvc.spec.replicas


def _strategy(isvc: InferenceService) -> dict[str, Any]:
    """Roll CPU pods with a surge (no capacity lost); roll GPU pods in place.

    A surge pod needs GPUs that a full node pool does not have, and would sit
    Pending forever, stalling the rollout; so GPU rollouts replace one pod at a time.
    """
    if isvc.spec.resources.gpus > 0:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}}


def render_service(isvc: InferenceService, settings: Settings | None = None, suffix: str = "") -> dict[str, Any]:
    """A ClusterIP Service: port 80 to the runtime's http port, 8081 to its gRPC port. With suffix
    `-predictor`, the name KServe gives its predictor's Service: the same pods, so that a KServe
    client's URL (status.address.url) keeps working."""
    metadata = _metadata(isvc)
    metadata["name"] += suffix
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(isvc),
            "ports": service_ports(isvc),
        },
    }


def _behavior(autoscaling: AutoscalingSpec) -> dict[str, Any] | None:
    """The HPA's stabilization windows, where the spec gives them."""
    behavior = {}
    if autoscaling.scale_up_seconds is not None:
        behavior["scaleUp"] = {"stabilizationWindowSeconds": autoscaling.scale_up_seconds}
    if autoscaling.scale_down_seconds is not None:
        behavior["scaleDown"] = {"stabilizationWindowSeconds": autoscaling.scale_down_seconds}
    return behavior or None


def _target_quantity(value: float) -> str:
    """A per-replica target as a Quantity: whole numbers plain, fractions in milli-units."""
    return str(int(value)) if value == int(value) else f"{round(value * 1000)}m"


def render_hpa(isvc: InferenceService, settings: Settings | None = None) -> dict[str, Any] | None:
    """An autoscaling/v2 HorizontalPodAutoscaler on the Deployment (autoscaling.class hpa), or None.

    On cpu: utilization of the CPU request. On a load metric: the pods' own forkless_* gauge,
    averaged per pod, which a custom metrics adapter (prometheus-adapter) must serve."""
    autoscaling = isvc.spec.autoscaling
    if autoscaling is None or autoscaling.class_ != "hpa":
        return None
    target = autoscaling.effective_target
    if autoscaling.metric == "cpu":
        metric: dict[str, Any] = {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": int(target)}}}
    else:
        metric = {"type": "Pods", "pods": {"metric": {"name": LOAD_METRICS[autoscaling.metric]},
                                           "target": {"type": "AverageValue",
                                                      "averageValue": _target_quantity(target)}}}
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": isvc.metadata.name},
        "minReplicas": autoscaling.min_replicas,
        "maxReplicas": autoscaling.max_replicas,
        "metrics": [metric],
    }
    behavior = _behavior(autoscaling)
    if behavior:
        spec["behavior"] = behavior
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(isvc),
            "spec": spec}


def fully_loaded(isvc: InferenceService) -> int:
    """The load a replica that cannot report its own counts as: its queue limit (plus what its workers
    hold, for inFlight). A saturated server is the one likeliest to miss a scrape."""
    spec = isvc.spec
    queue = spec.runtime.max_queue or int(DEFAULTS["max_queue"])
    if spec.autoscaling is not None and spec.autoscaling.metric == "inFlight":
        workers = spec.workers if isinstance(spec.workers, int) else 1
        batch = spec.runtime.batching.max_batch_size if spec.runtime.batching and spec.runtime.batching.max_batch_size else 1
        return queue + workers * batch
    return queue


# How often KEDA asks for the load (its default, 30 s, is slow for request bursts).
KEDA_POLLING_INTERVAL_S = 5


def render_scaled_object(isvc: InferenceService, settings: Settings | None = None) -> dict[str, Any] | None:
    """A KEDA ScaledObject on the Deployment (autoscaling.class keda), or None.

    Its trigger is the operator itself (KEDA's external scaler protocol: forkless_operator.scaler
    reads each ready pod's /metrics), or a Prometheus query when the operator knows a Prometheus.
    Trigger metadata are strings, as KEDA's CRD requires."""
    autoscaling = isvc.spec.autoscaling
    if autoscaling is None or autoscaling.class_ != "keda":
        return None
    settings = settings or get_settings()
    target = autoscaling.effective_target
    name, namespace = isvc.metadata.name, isvc.metadata.namespace
    if settings.prometheus_address:
        # One element (KEDA refuses several): the sum over this InferenceService's pods.
        trigger: dict[str, Any] = {"type": "prometheus", "metadata": {
            "serverAddress": settings.prometheus_address,
            "query": (f'sum({LOAD_METRICS[autoscaling.metric]}{{namespace="{namespace}",'
                      f'pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}})'),
            "threshold": _target_quantity(target)}}
    else:
        trigger = {"type": "external", "metadata": {
            "scalerAddress": settings.scaler_address, "metric": autoscaling.metric,
            "target": _target_quantity(target), "inferenceService": name,
            "fullyLoaded": str(fully_loaded(isvc))}}
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicaCount": autoscaling.min_replicas,
        "maxReplicaCount": autoscaling.max_replicas,
        "pollingInterval": KEDA_POLLING_INTERVAL_S,
        "triggers": [trigger],
    }
    behavior = _behavior(autoscaling)
    if behavior:
        spec["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": behavior}}
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _metadata(isvc), "spec": spec}


def render_pdb(isvc: InferenceService, settings: Settings | None = None) -> dict[str, Any] | None:
    """A PodDisruptionBudget allowing one pod down at a time, or None when there can be only one replica."""
    autoscaling = isvc.spec.autoscaling
    most = autoscaling.max_replicas if autoscaling else desired_replicas(isvc)
    if most <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(isvc),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(isvc)}},
    }


def render_children(isvc: InferenceService, settings: Settings | None = None,
                    credentials: StorageCredentials = NO_CREDENTIALS) -> dict[str, dict[str, Any] | None]:
    """Every child by role (forkless_operator.kinds.CHILDREN); None marks a child this InferenceService must not have."""
    settings = settings or get_settings()
    if isvc.spec.engine == "ray":  # KubeRay renders the pods and Services from the RayService
        from forkless_operator.render_ray import render_ray_service

        return {child.role: None for child in kinds.CHILDREN} | {
            "RayService": render_ray_service(isvc, settings, credentials)}
    return {
        "Deployment": render_deployment(isvc, settings, credentials),
        "Service": render_service(isvc, settings),
        "PredictorService": render_service(isvc, settings, suffix="-predictor"),
        "HorizontalPodAutoscaler": render_hpa(isvc, settings),
        "ScaledObject": render_scaled_object(isvc, settings),
        "PodDisruptionBudget": render_pdb(isvc, settings),
        "RayService": None,
    }
