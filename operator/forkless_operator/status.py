"""Status is computed, never accumulated: a pure function of the children as they are now.

``compute_status`` takes the InferenceService, its Deployment and pods as read
from the API server, and returns the whole ``status`` to write through /status.
Two conditions: ``Reconciled`` (the children were applied for this generation)
and ``Ready`` (the Deployment's updated replicas are available), each with a
CamelCase reason and ``observedGeneration``. ``lastTransitionTime`` only moves
when a condition's status changes, so recomputing an unchanged state writes
nothing new.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from forkless_runtime.termination import MODEL_DOWNLOAD_FAILED, MODEL_OUT_OF_MEMORY
from forkless_runtime.termination import REASONS as MODEL_REASONS

from forkless_operator.render import DOWNLOAD_CONTAINER, desired_replicas, selector_string, service_url
from forkless_operator.render_ray import serve_url
from forkless_operator.settings import Settings
from forkless_operator.spec import (
    Addressable,
    Condition,
    FailureInfo,
    InferenceService,
    InferenceServiceStatus,
    ModelCopies,
    ModelState,
    ModelStates,
    ModelStatus,
)
from forkless_operator.status_ray import ray_view

READY = "Ready"
RECONCILED = "Reconciled"
# Ready=False reasons on the ordinary way to Ready: not problems, no Warning event.
ON_THE_WAY_REASONS = ("Pending", "DeploymentMissing", "Progressing", "RayInitializing", "ServeDeploying")
DEGRADED = "Degraded"  # engine ray: a Serve deployment is UNHEALTHY
UPGRADING = "Upgrading"  # engine ray: KubeRay is switching to a new RayCluster

# Container waiting reasons worth surfacing, in the order we report them.
_WAITING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
)


@dataclass(frozen=True)
class Observation:
    """A condition's value before timestamps: True/False, a CamelCase reason and a message."""

    ok: bool
    reason: str
    message: str


APPLIED = Observation(True, "Applied", "all children are applied for this generation")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _condition(
    kind: str, observation: Observation, generation: int | None, previous: Mapping[str, Condition], now: str
) -> Condition:
    status: Literal["True", "False"] = "True" if observation.ok else "False"
    before = previous.get(kind)
    since = before.last_transition_time if before is not None and before.status == status else now
    return Condition(
        type=kind,
        status=status,
        reason=observation.reason,
        message=observation.message,
        last_transition_time=since,
        observed_generation=generation,
    )


@dataclass(frozen=True)
class ModelFailure:
    """A container that gave up on the model, with its last words (forkless_runtime.termination)."""

    reason: str
    message: str
    exit_code: int | None
    location: str
    time: str | None

    def observation(self) -> Observation:
        return Observation(False, self.reason, f"{self.message} ({self.location}, exit code {self.exit_code})")

    def info(self) -> FailureInfo:
        return FailureInfo(reason=self.reason, message=self.message, exit_code=self.exit_code,
                           location=self.location, time=self.time)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def container_failure(pod_name: str, container: Mapping[str, Any]) -> ModelFailure | None:
    """Why this container stopped, when it is a model failure: the reason the runtime or the download
    wrote to the termination log, or the kernel's OOM kill.

    A container that runs again after a failure (the kubelet's retry) still reports it until it is
    ready or has completed: otherwise every retry would flip Ready's reason and back.
    """
    state = container.get("state") or {}
    if container.get("ready") or (state.get("terminated") or {}).get("exitCode", 1) == 0:
        return None
    terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
    if not terminated or terminated.get("exitCode", 0) == 0:
        return None
    name = container.get("name", "")
    location = f"pod {pod_name} container {name}"
    exit_code = terminated.get("exitCode")
    finished = terminated.get("finishedAt")
    message = _first_line(terminated.get("message") or "")
    reason, _, detail = message.partition(": ")
    if reason in MODEL_REASONS:
        return ModelFailure(reason, detail, exit_code, location, finished)
    if terminated.get("reason") == "OOMKilled":
        return ModelFailure(MODEL_OUT_OF_MEMORY, "the container exceeded its memory limit and was killed (OOMKilled)",
                            exit_code, location, finished)
    if name == DOWNLOAD_CONTAINER:
        return ModelFailure(MODEL_DOWNLOAD_FAILED, message or f"the download exited with code {exit_code}",
                            exit_code, location, finished)
    return None


def model_failures(pods: Iterable[Mapping[str, Any]]) -> list[ModelFailure]:
    """Every pod's model failure, in pod order: init containers first (a download precedes a load)."""
    found: list[ModelFailure] = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        name = pod.get("metadata", {}).get("name", "")
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            failure = container_failure(name, container)
            if failure is not None:
                found.append(failure)
                break
    return found


def pod_problem(pods: Iterable[Mapping[str, Any]]) -> Observation | None:
    """Why pods cannot become ready: a model that cannot download or load, the scheduler's message,
    an image pull or a crash loop."""
    pod_list = list(pods)
    failures = model_failures(pod_list)
    if failures:
        return failures[0].observation()
    found: list[tuple[int, str, Observation]] = []
    for pod in pod_list:
        name = pod.get("metadata", {}).get("name", "")
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                message = f"pod {name} cannot be scheduled: {condition.get('message', '')}".rstrip(": ")
                found.append((0, name, Observation(False, "Unschedulable", message)))
        containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in containers:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in _WAITING_REASONS:
                detail = waiting.get("message") or reason
                message = f"container {container.get('name')} of pod {name} cannot start: {detail}"
                found.append((1 + _WAITING_REASONS.index(reason), name, Observation(False, reason, message)))
    return min(found, key=lambda item: item[:2])[2] if found else None


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _pod_loading(pod: Mapping[str, Any]) -> bool:
    """Downloading or loading: an init or runtime container is running (but the pod is not ready)."""
    status = pod.get("status") or {}
    containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    return any("running" in (c.get("state") or {}) for c in containers)


def model_status(pods: Iterable[Mapping[str, Any]], ready: bool, previous: ModelStatus | None) -> ModelStatus:
    """status.modelStatus in KServe's shape, from the pods as they are now.

    The target state is the rollout's (FailedToLoad as soon as a pod fails, Loaded once Ready), the
    active one what the ready pods serve; lastFailureInfo keeps the last failure seen until a new one.
    """
    live = [pod for pod in pods if not pod.get("metadata", {}).get("deletionTimestamp")]
    failures = model_failures(live)
    ready_pods = sum(1 for pod in live if _pod_ready(pod))
    target: ModelState
    if ready:
        target = "Loaded"
    elif failures:
        target = "FailedToLoad"
    elif any(_pod_loading(pod) for pod in live):
        target = "Loading"
    else:
        target = "Pending"
    active: ModelState = "Loaded" if ready_pods else target
    transition: Literal["UpToDate", "InProgress", "BlockedByFailedLoad"] = (
        "UpToDate" if ready else "BlockedByFailedLoad" if failures else "InProgress"
    )
    last_failure = failures[0].info() if failures else (previous.last_failure_info if previous else None)
    return ModelStatus(
        transition_status=transition,
        states=ModelStates(active_model_state=active, target_model_state=target),
        last_failure_info=last_failure,
        copies=ModelCopies(failed_copies=len(failures), total_copies=len(live)),
    )


def deployment_readiness(deployment: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]) -> Observation:
    """Ready when the Deployment's updated replicas are all available; otherwise the best reason why not."""
    if deployment is None:
        return Observation(False, "DeploymentMissing", "the Deployment does not exist yet")
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    available = status.get("availableReplicas", 0)
    generation = deployment.get("metadata", {}).get("generation", 0)
    caught_up = status.get("observedGeneration", 0) >= generation
    if caught_up and updated >= desired and available >= desired and status.get("replicas", 0) <= desired:
        if desired == 0:
            return Observation(True, "ScaledToZero", "the Deployment is scaled to zero replicas")
        return Observation(True, "Available", f"{available}/{desired} replicas are available")
    problem = pod_problem(pods)
    if problem is not None:
        return problem
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return Observation(False, "ProgressDeadlineExceeded", condition.get("message", "the rollout stalled"))
    if not caught_up:
        return Observation(False, "Progressing", "the Deployment controller has not observed the latest spec yet")
    return Observation(False, "Progressing", f"{updated} of {desired} updated replicas exist, {available} are available")


def compute_status(
    isvc: InferenceService,
    deployment: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    generation: int,
    *,
    reconciled: Observation | None = None,
    problem: Observation | None = None,
    previous: InferenceServiceStatus | None = None,
    settings: Settings | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """The full status to write through /status, in its wire form (camelCase, no nulls).

    ``reconciled`` is the outcome of applying the children for ``generation``;
    None when only the children changed (a pod event), which keeps the previous
    Reconciled condition and observedGeneration. ``problem`` is a semantic error
    found while reconciling (a missing claim) that makes Ready False whatever the
    pods say.
    """
    now = now or now_rfc3339()
    previous = previous or InferenceServiceStatus()
    before = {c.type: c for c in previous.conditions}

    if reconciled is not None:
        observed: int | None = generation
        reconciled_condition = _condition(RECONCILED, reconciled, generation, before, now)
    else:
        observed = previous.observed_generation
        reconciled_condition = before.get(RECONCILED) or _condition(
            RECONCILED, Observation(False, "Pending", "the children have not been applied yet"), observed, before, now
        )

    pod_list = list(pods)
    if isvc.spec.engine == "ray":
        return _ray_status(isvc, deployment, pod_list, observed, reconciled_condition, problem, previous, before,
                           settings, now)
    if reconciled_condition.status != "True":
        readiness = Observation(False, reconciled_condition.reason, reconciled_condition.message)
    elif problem is not None:
        readiness = problem
    else:
        readiness = deployment_readiness(deployment, pod_list)
    ready_condition = _condition(READY, readiness, observed, before, now)

    deployment_status = (deployment or {}).get("status") or {}
    if deployment is not None:
        desired = (deployment.get("spec") or {}).get("replicas", 1)
    else:
        desired = 0 if isvc.spec.autoscaling else desired_replicas(isvc)
    ready_replicas = deployment_status.get("readyReplicas", 0)
    status = InferenceServiceStatus(
        observed_generation=observed,
        url=service_url(isvc, settings),
        address=Addressable(url=service_url(isvc, settings, suffix="-predictor")),
        replicas=deployment_status.get("replicas", 0),
        ready_replicas=ready_replicas,
        replica_summary=f"{ready_replicas}/{desired}",
        selector=selector_string(isvc),
        gpus=isvc.spec.resources.gpus * desired,
        workers=isvc.spec.workers if isinstance(isvc.spec.workers, int) else None,
        model_status=model_status(pod_list, readiness.ok, previous.model_status),
        conditions=[ready_condition, reconciled_condition],
    )
    return status.model_dump(by_alias=True, exclude_none=True)


def _ray_status(isvc: InferenceService, rayservice: Mapping[str, Any] | None, pods: list[Mapping[str, Any]],
                observed: int | None, reconciled_condition: Condition, problem: Observation | None,
                previous: InferenceServiceStatus, before: Mapping[str, Condition], settings: Settings | None,
                now: str) -> dict[str, Any]:
    """compute_status for engine ray: the RayService stands where the Deployment does (status_ray)."""
    view = ray_view(isvc, rayservice)
    if reconciled_condition.status != "True":
        readiness = Observation(False, reconciled_condition.reason, reconciled_condition.message)
    elif problem is not None:
        readiness = problem
    else:
        # A pod that cannot pull its image or crashes says more than KubeRay's "initializing".
        readiness = (None if view.ready[0] else pod_problem(pods)) or Observation(*view.ready)
    url = serve_url(isvc, settings)
    status = InferenceServiceStatus(
        observed_generation=observed,
        url=url,
        address=Addressable(url=url),
        replicas=view.replicas,
        ready_replicas=view.ready_replicas,
        replica_summary=f"{view.ready_replicas}/{view.desired_replicas}",
        selector=selector_string(isvc),
        gpus=view.gpus,
        workers=isvc.spec.workers if isinstance(isvc.spec.workers, int) else None,
        model_status=model_status(pods, readiness.ok, previous.model_status),
        ray=view.ray,
        conditions=[_condition(READY, readiness, observed, before, now), reconciled_condition,
                    _condition(DEGRADED, Observation(*view.degraded), observed, before, now),
                    _condition(UPGRADING, Observation(*view.upgrading), observed, before, now)],
    )
    return status.model_dump(by_alias=True, exclude_none=True)


def _ready(status: InferenceServiceStatus | Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if isinstance(status, InferenceServiceStatus):
        status = status.model_dump(by_alias=True)
    return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == READY), None)


def new_problem(previous: InferenceServiceStatus | Mapping[str, Any] | None,
                status: Mapping[str, Any]) -> Observation | None:
    """Ready's problem when it is new in ``status``: the one Warning event per transition, never one per
    retry, and none on the ordinary way to Ready (a rollout in progress)."""
    now, before = _ready(status), _ready(previous)
    if now is None or now.get("status") != "False" or now.get("reason") in ON_THE_WAY_REASONS:
        return None
    if before is not None and (before.get("status"), before.get("reason")) == ("False", now.get("reason")):
        return None
    return Observation(False, str(now.get("reason")), str(now.get("message", "")))


def invalid_spec_status(message: str, generation: int, previous: InferenceServiceStatus | None = None,
                        now: str | None = None) -> dict[str, Any]:
    """Status of an InferenceService whose spec the operator cannot parse: both conditions False."""
    now = now or now_rfc3339()
    previous = previous or InferenceServiceStatus()
    before = {c.type: c for c in previous.conditions}
    observation = Observation(False, "InvalidSpec", message)
    status = InferenceServiceStatus(
        observed_generation=generation,
        conditions=[
            _condition(READY, observation, generation, before, now),
            _condition(RECONCILED, observation, generation, before, now),
        ],
    )
    return status.model_dump(by_alias=True, exclude_none=True)
