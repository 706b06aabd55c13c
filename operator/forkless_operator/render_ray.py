"""Pure renderers for ``engine: ray``: an InferenceService in, a KubeRay RayService (ray.io/v1) out.

Users never write KubeRay's ``serveConfigV2`` (an untyped string whose typos Serve ignores): it is the
YAML of a typed dict built here. Its one application imports ``forkless_runtime.engines.ray:build_app``
with the runtime's own settings (the same table the Deployment's FORKLESS_* variables come from), so one
model file or ``module:Class`` handler serves under both engines. The head pod runs Ray's control plane and
no replica; each worker group pod carries the GPU limit and toleration, ``/dev/shm``, the model volume and
the same download init container as a Deployment's pod.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from forkless_runtime.settings import RAY_REPLICA_SETTINGS
from kubernetes.utils import parse_quantity

from forkless_operator.credentials import NO_CREDENTIALS, StorageCredentials
from forkless_operator.pod_template import apply_pod_template
from forkless_operator.render import (
    MODEL_CACHE_PATH,
    MODEL_MOUNT_PATH,
    RUNTIME_CONTAINER,
    _container_security_context,
    _metadata,
    _quantity,
    labels,
    model_source,
    runtime_settings,
    shared_memory_size,
    tolerations,
)
from forkless_operator.settings import Settings, get_settings
from forkless_operator.spec import InferenceService

RAY_API_VERSION = "ray.io/v1"
SERVE_PORT = 8000
DASHBOARD_PORT = 8265
APP_IMPORT_PATH = "forkless_runtime.engines.ray:build_app"
DEPLOYMENT_NAME = "ForklessModel"  # forkless_runtime.engines.ray.DEPLOYMENT_NAME (not imported: it needs numpy)
HEAD_CONTAINER = "ray-head"
INITIALIZING_TIMEOUT_ANNOTATION = "ray.io/initializing-timeout"
# Serve's HAProxy ingress (Ray >= 2.55): HAProxy on :8000, each replica on its own HTTP port.
HAPROXY_ENV = ({"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"}, {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"})


def serve_url(isvc: InferenceService, settings: Settings | None = None) -> str:
    """KubeRay's `<name>-serve-svc`: it moves its selector to the new cluster during a blue/green upgrade."""
    settings = settings or get_settings()
    return (f"http://{isvc.metadata.name}-serve-svc.{isvc.metadata.namespace}.svc.{settings.cluster_domain}"
            f":{SERVE_PORT}")


def threads_per_replica(isvc: InferenceService) -> int:
    return isvc.spec.runtime.threads_per_worker or 1


def replicas_per_unit(isvc: InferenceService) -> int:
    """Serve replicas per replica of the service (runtime.workers; one per GPU, else 1)."""
    workers = isvc.spec.workers
    return workers if isinstance(workers, int) else 1


def gpus_per_replica(isvc: InferenceService) -> float:
    """ray_actor_options.num_gpus: ray.gpusPerReplica, else the service's GPUs shared by its workers."""
    gpus = isvc.spec.resources.gpus
    if gpus == 0:
        return 0.0
    explicit = isvc.spec.ray_settings.gpus_per_replica
    return explicit if explicit is not None else gpus / replicas_per_unit(isvc)


def pods_per_unit(isvc: InferenceService) -> int:
    """Ray worker pods per replica of the service: its GPUs split into pods of ray.gpusPerWorkerPod."""
    gpus = isvc.spec.resources.gpus
    return gpus // isvc.spec.ray_settings.gpus_per_worker_pod if gpus else 1


def replica_settings(isvc: InferenceService, settings: Settings | None = None) -> dict[str, Any]:
    """The forkless-runtime settings each Serve replica parses (forkless_runtime.settings.RAY_REPLICA_SETTINGS),
    taken from the same function that renders a Deployment's FORKLESS_* variables."""
    values = runtime_settings(isvc, settings)
    values["threads_per_worker"] = threads_per_replica(isvc)
    share = gpus_per_replica(isvc)
    values["gpu_memory_fraction"] = share if 0 < share < 1 else None  # Ray shares a GPU logically only
    return {field: values[field] for field in RAY_REPLICA_SETTINGS if values.get(field) is not None}


def serve_deployment(isvc: InferenceService) -> dict[str, Any]:
    """The application's one Serve deployment: replica count or Serve's autoscaler, and its resources."""
    spec, ray = isvc.spec, isvc.spec.ray_settings
    per_unit = replicas_per_unit(isvc)
    deployment: dict[str, Any] = {"name": DEPLOYMENT_NAME, "max_ongoing_requests": ray.max_ongoing_requests}
    if spec.autoscaling is not None:
        autoscaling = spec.autoscaling
        config: dict[str, Any] = {
            "min_replicas": autoscaling.min_replicas * per_unit,
            "max_replicas": autoscaling.max_replicas * per_unit,
            "target_ongoing_requests": autoscaling.effective_target,
        }
        if autoscaling.scale_up_seconds is not None:
            config["upscale_delay_s"] = autoscaling.scale_up_seconds
        if autoscaling.scale_down_seconds is not None:
            config["downscale_delay_s"] = autoscaling.scale_down_seconds
        deployment["autoscaling_config"] = config
    else:
        deployment["num_replicas"] = (1 if spec.replicas is None else spec.replicas) * per_unit
    if spec.runtime.max_queue is not None:
        deployment["max_queued_requests"] = spec.runtime.max_queue
    options: dict[str, Any] = {"num_cpus": threads_per_replica(isvc)}
    share = gpus_per_replica(isvc)
    if share:
        options["num_gpus"] = share
    deployment["ray_actor_options"] = options
    return deployment


def serve_config(isvc: InferenceService, settings: Settings | None = None) -> dict[str, Any]:
    """serveConfigV2 as a dict (Serve's ServeDeploySchema): one application, one deployment."""
    http: dict[str, Any] = {"host": "0.0.0.0", "port": SERVE_PORT}
    if isvc.spec.runtime.request_timeout_seconds is not None:
        http["request_timeout_s"] = isvc.spec.runtime.request_timeout_seconds
    return {
        "proxy_location": "EveryNode",
        "http_options": http,
        "applications": [{
            "name": isvc.model_name,
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": {"settings": replica_settings(isvc, settings)},
            "deployments": [serve_deployment(isvc)],
        }],
    }


def _ray_env(isvc: InferenceService) -> list[dict[str, Any]]:
    return [dict(e) for e in HAPROXY_ENV] if isvc.spec.ray_settings.ingress == "haproxy" else []


def _head_group(isvc: InferenceService, settings: Settings, image: str) -> dict[str, Any]:
    head = isvc.spec.ray_settings.head
    container: dict[str, Any] = {
        "name": HEAD_CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": {"requests": {"cpu": _quantity(head.cpu), "memory": _quantity(head.memory)},
                      "limits": {"memory": _quantity(head.memory)}},
        "ports": [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                  {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": SERVE_PORT}],
    }
    env = _ray_env(isvc)
    if env:
        container["env"] = env
    pod: dict[str, Any] = {"containers": [container], "enableServiceLinks": False}
    if isvc.spec.service_account_name:
        pod["serviceAccountName"] = isvc.spec.service_account_name
    _schedule(pod, isvc, settings, gpu=False)
    return {
        # No replica on the head: it holds no GPU, and losing it loses the cluster anyway.
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"metadata": {"labels": labels(isvc)}, "spec": pod},
    }


def _schedule(pod: dict[str, Any], isvc: InferenceService, settings: Settings, *, gpu: bool) -> None:
    """spec.scheduling on a Ray pod: the head follows it too (it must run where the cluster's pods can
    reach it), without the GPU taint's toleration, as it holds no GPU."""
    pod_tolerations = tolerations(isvc, settings)
    if not gpu:
        pod_tolerations = [t for t in pod_tolerations
                           if t != {"key": settings.gpu_taint_key, "operator": "Exists", "effect": "NoSchedule"}]
    if pod_tolerations:
        pod["tolerations"] = pod_tolerations
    scheduling = isvc.spec.scheduling
    if scheduling is not None:
        for key, value in (("nodeSelector", scheduling.node_selector), ("affinity", scheduling.affinity),
                           ("priorityClassName", scheduling.priority_class_name),
                           ("topologySpreadConstraints", scheduling.topology_spread_constraints)):
            if value:
                pod[key] = value


def _worker_resources(isvc: InferenceService, settings: Settings) -> dict[str, Any]:
    resources = isvc.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if resources.cpu is not None:
        requests["cpu"] = _quantity(resources.cpu)
    if resources.memory is not None:
        requests["memory"] = limits["memory"] = _quantity(resources.memory)
    if resources.gpus:
        gpu = resources.gpu_resource_name or settings.gpu_resource_name
        requests[gpu] = limits[gpu] = str(isvc.spec.ray_settings.gpus_per_worker_pod)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def worker_cpus(isvc: InferenceService) -> int:
    """Ray's num-cpus of a worker pod: its CPU request, else what its replicas take."""
    per_pod = math.ceil(replicas_per_unit(isvc) / pods_per_unit(isvc)) * threads_per_replica(isvc)
    cpu = isvc.spec.resources.cpu
    return max(per_pod, math.ceil(parse_quantity(cpu))) if cpu is not None else per_pod


def _worker_group(isvc: InferenceService, settings: Settings, image: str,
                  credentials: StorageCredentials) -> dict[str, Any]:
    spec = isvc.spec
    _, model_volume, download = model_source(isvc, credentials)
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                   "sizeLimit": shared_memory_size(isvc)}}]
    if model_volume is not None:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT_PATH, "readOnly": True})
        volumes.append(model_volume)
    if download is not None:
        volumes += credentials.volumes
        if spec.model.cache is not None:
            mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_PATH, "readOnly": True})
            volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.model.cache.claim_name}})
    container: dict[str, Any] = {
        "name": RUNTIME_CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": _worker_resources(isvc, settings),
        "volumeMounts": mounts,
    }
    env = [*_ray_env(isvc), *(e.model_dump(by_alias=True, exclude_none=True) for e in spec.runtime.env)]
    if env:
        container["env"] = env
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes, "enableServiceLinks": False}
    if download is not None:
        pod["initContainers"] = [{**download, "image": image, "imagePullPolicy": settings.image_pull_policy,
                                  "securityContext": _container_security_context()}]
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    _schedule(pod, isvc, settings, gpu=True)
    per_unit = pods_per_unit(isvc)
    if spec.autoscaling is not None:
        least, most = spec.autoscaling.min_replicas * per_unit, spec.autoscaling.max_replicas * per_unit
    else:
        least = most = (1 if spec.replicas is None else spec.replicas) * per_unit
    start = {"num-cpus": str(worker_cpus(isvc))}
    if spec.resources.gpus:
        # Explicit, so that any gpuResourceName (a MIG profile) counts as Ray GPUs.
        start["num-gpus"] = str(spec.ray_settings.gpus_per_worker_pod)
    return {
        "groupName": "gpu" if spec.resources.gpus else "cpu",
        "replicas": least,
        "minReplicas": least,
        "maxReplicas": most,
        "rayStartParams": start,
        "template": apply_pod_template({"metadata": {"labels": labels(isvc)}, "spec": pod}, spec.pod_template,
                                       RUNTIME_CONTAINER),
    }


def render_ray_service(isvc: InferenceService, settings: Settings | None = None,
                       credentials: StorageCredentials = NO_CREDENTIALS) -> dict[str, Any] | None:
    """The RayService of an engine ray InferenceService, or None for engine deployment."""
    if isvc.spec.engine != "ray":
        return None
    settings = settings or get_settings()
    ray = isvc.spec.ray_settings
    image = isvc.spec.runtime.image or settings.ray_image
    metadata = _metadata(isvc)
    metadata["annotations"] = {INITIALIZING_TIMEOUT_ANNOTATION: f"{ray.startup_timeout_seconds}s"}
    cluster: dict[str, Any] = {
        "rayVersion": ray.ray_version,
        "headGroupSpec": _head_group(isvc, settings, image),
        "workerGroupSpecs": [_worker_group(isvc, settings, image, credentials)],
    }
    if isvc.spec.autoscaling is not None:
        cluster["enableInTreeAutoscaling"] = True  # Serve adds replicas; Ray's autoscaler adds the pods for them
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": {"type": ray.upgrade_strategy},
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": yaml.safe_dump(serve_config(isvc, settings), sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }
