"""What an engine ray InferenceService's status says, from its RayService as KubeRay reports it (pure).

KubeRay's own ``Ready`` means only that the serve Service has an endpoint: it stays True while the Serve
application fails to deploy or is unhealthy. Here Ready is True only when the RayService is Ready, its
application is RUNNING and KubeRay has observed the RayService's current generation; otherwise the reason
says which of them is missing. ``Degraded`` says a Serve deployment is UNHEALTHY (a replica died and is
being replaced); ``Upgrading`` mirrors KubeRay's blue/green switch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.utils import parse_quantity

from forkless_operator.spec import InferenceService, RayServiceStatus

# KubeRay v1.5.0 condition types and reasons (apis/ray/v1/rayservice_types.go).
RAY_READY = "Ready"
UPGRADE_IN_PROGRESS = "UpgradeInProgress"
INITIALIZING_TIMEOUT = "InitializingTimeout"
ZERO_SERVE_ENDPOINTS = "ZeroServeEndpoints"
RUNNING = "RUNNING"
DEPLOY_FAILED = "DEPLOY_FAILED"
UNHEALTHY = "UNHEALTHY"


@dataclass(frozen=True)
class RayView:
    """The InferenceService's status as the RayService shows it."""

    ready: tuple[bool, str, str]
    degraded: tuple[bool, str, str]
    upgrading: tuple[bool, str, str]
    replicas: int
    ready_replicas: int
    desired_replicas: int
    gpus: int
    ray: RayServiceStatus | None


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in status.get("conditions") or []}


def _app(service_status: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    return ((service_status or {}).get("applicationStatuses") or {}).get(name) or {}


def _said(app: Mapping[str, Any]) -> str:
    """The application's message and each deployment's (where Serve puts a constructor's error)."""
    said = [app["message"]] if app.get("message") else []
    said += [f"{name}: {d['message']}" for name, d in (app.get("serveDeploymentStatuses") or {}).items()
             if d.get("message")]
    return "; ".join(said)


def _unhealthy_deployments(app: Mapping[str, Any]) -> list[str]:
    deployments = app.get("serveDeploymentStatuses") or {}
    return [f"{name}: {d.get('message') or UNHEALTHY}" for name, d in deployments.items() if d.get("status") == UNHEALTHY]


def _gpus(cluster: Mapping[str, Any]) -> int:
    value = cluster.get("desiredGPU")
    return int(parse_quantity(str(value))) if value not in (None, "") else 0


def ray_view(isvc: InferenceService, rayservice: Mapping[str, Any] | None) -> RayView:
    """Ready, Degraded and Upgrading, and the counts, from the RayService (None: not created yet)."""
    name = isvc.metadata.name
    if rayservice is None:
        return RayView((False, "RayInitializing", "the RayService does not exist yet"),
                       (False, "Healthy", "no Serve deployment is unhealthy"),
                       (False, "NoUpgrade", "no upgrade is in progress"), 0, 0, 0, 0, None)
    status = rayservice.get("status") or {}
    conditions = _conditions(status)
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    app = _app(active, isvc.model_name)
    pending_app = _app(pending, isvc.model_name)
    app_status, app_message = app.get("status"), app.get("message") or ""
    generation = (rayservice.get("metadata") or {}).get("generation", 0)
    observed = status.get("observedGeneration")
    ray_ready = conditions.get(RAY_READY, {})
    upgrade = conditions.get(UPGRADE_IN_PROGRESS, {})

    if ray_ready.get("reason") == INITIALIZING_TIMEOUT:
        ready = (False, "RayInitializingTimeout", ray_ready.get("message") or
                 "the Ray cluster did not serve within ray.startupTimeoutSeconds; KubeRay deleted it")
    elif observed is None or observed < generation:
        ready = (False, "RayInitializing", f"KubeRay has not observed generation {generation} of RayService {name} yet")
    elif DEPLOY_FAILED in (app_status, pending_app.get("status")):
        failed = app if app_status == DEPLOY_FAILED else pending_app
        ready = (False, "ServeDeployFailed", _said(failed) or "the Serve application failed to deploy")
    elif ray_ready.get("status") != "True":
        if ray_ready.get("reason") == ZERO_SERVE_ENDPOINTS:
            ready = (False, "NoServeEndpoints", f"the serve Service {name}-serve-svc has no ready endpoint")
        else:
            ready = (False, "RayInitializing", ray_ready.get("message") or "the Ray cluster is starting")
    elif app_status != RUNNING:
        reason = "ServeUnhealthy" if app_status == UNHEALTHY else "ServeDeploying"
        # While deploying, Serve says why replicas do not start (a constructor error, retried) per deployment.
        said = _said(app)
        ready = (False, reason, f"the Serve application {isvc.model_name} is {app_status or 'not deployed yet'}"
                 + (f": {said}" if said else ""))
    else:
        ready = (True, "Serving", f"the Serve application {isvc.model_name} is RUNNING with "
                 f"{status.get('numServeEndpoints', 0)} serve endpoint(s)")

    unhealthy = _unhealthy_deployments(app)
    degraded = ((True, "ServeDeploymentUnhealthy", "; ".join(unhealthy)) if unhealthy
                else (False, "Healthy", "no Serve deployment is unhealthy"))
    if upgrade.get("status") == "True":
        upgrading = (True, "NewClusterPending", f"RayCluster {pending.get('rayClusterName') or '(pending)'} is being "
                     f"prepared to replace {active.get('rayClusterName') or '(none)'}; traffic switches once it serves")
    else:
        upgrading = (False, "NoUpgrade", "no upgrade is in progress")

    cluster = active.get("rayClusterStatus") or {}
    replicas = int(cluster.get("desiredWorkerReplicas") or 0)
    gpus = _gpus(cluster) + (_gpus(pending.get("rayClusterStatus") or {}) if upgrading[0] else 0)
    return RayView(
        ready=ready, degraded=degraded, upgrading=upgrading,
        replicas=replicas, ready_replicas=int(cluster.get("readyWorkerReplicas") or 0), desired_replicas=replicas,
        gpus=gpus,
        ray=RayServiceStatus(
            ray_service=name,
            active_cluster=active.get("rayClusterName") or None,
            pending_cluster=pending.get("rayClusterName") or None,
            app_status=app_status,
            app_message=(app_message or None) if app_message is None or len(app_message) <= 4096 else app_message[:4096],
            num_serve_endpoints=status.get("numServeEndpoints"),
            observed_generation=observed,
        ),
    )
