"""Every kopf decorator of the operator, and nothing else of substance.

One level-based ``reconcile`` for create, update (of spec) and resume: parse,
render, server-side apply, compute status, write it through /status. The
children's watch events repair drift (a deleted or edited child is applied
again) and keep the status current. ``reconcile`` is synchronous: kopf runs it
in its thread pool, and the ``kubernetes`` client is synchronous too. The
indexes and the child and pod event handlers are async and only decide: what
an event asks for (a repair, a status refresh) is queued once per
InferenceService and done in threads of its own (forkless_operator.followups).

Loops cannot happen: status writes do not touch ``spec``, and ``reconcile``
reacts to ``spec`` alone; a child is re-applied only when it differs from what
the operator last applied (a newer generation, or resourceVersion for kinds
without one, or a label or annotation of ours changed), and an apply that
changes nothing changes neither.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from forkless_operator import kinds, metrics
from forkless_operator.apply import Kube, get_kube, is_retryable
from forkless_operator.credentials import NO_CREDENTIALS, StorageCredentials
from forkless_operator.drift import AppliedChildren
from forkless_operator.followups import FollowUps
from forkless_operator.memory import MemoryDiffBaseStorage, MemoryProgressStorage
from forkless_operator.ray_services import RayServices
from forkless_operator.reconcile import (
    KindNotServed,
    apply_children,
    download_credentials,
    freshest_deployment,
    model_claim_problem,
    parse,
    validation_message,
)
from forkless_operator.scaler import ScalerServer
from forkless_operator.settings import Settings, get_settings
from forkless_operator.spec import API_VERSION, GROUP, InferenceService, InferenceServiceStatus
from forkless_operator.status import APPLIED, Observation, compute_status, invalid_spec_status, new_problem
from forkless_operator.status_cache import StatusCache

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
OPERATOR = "forkless-operator"
OWNED = {MANAGED_BY: OPERATOR}
RETRY_DELAY_S = 10
# A missing ServiceAccount or Secret is looked for again this often, until it appears.
CREDENTIALS_RETRY_DELAY_S = 30
NOT_SERVED_RETRY_DELAY_S = 60  # KEDA installed later is found within a minute
PEERING_NAME = "forkless-operator"

ISVC = kinds.INFERENCE_SERVICE.resource
PODS = kinds.PODS.resource

Key = tuple[str, str]
Logger = logging.Logger | logging.LoggerAdapter[Any]
Index = kopf.Index[Key, dict[str, Any]]
log = logging.getLogger("forkless.operator")

# What this process remembers: the last status written per InferenceService, what it applied per
# child, and kopf's own bookkeeping (forkless_operator.memory).
STATUS = StatusCache(on_write=metrics.REGISTRY.status_written)
APPLIED_CHILDREN = AppliedChildren()
PROGRESS = MemoryProgressStorage()
DIFFBASE = MemoryDiffBaseStorage()
# The download credentials each InferenceService was last rendered with, for drift repair.
CREDENTIALS: dict[Key, StorageCredentials] = {}
# The RayService of each engine ray InferenceService as last seen (what the Deployment index is for
# engine deployment; not a kopf index because KubeRay may not be installed at all).
RAY_SERVICES = RayServices()
# How often an engine ray InferenceService's RayService is read directly (follow_ray_service).
RAY_RESYNC_S = 15.0


def _workload(key: Key, isvc_body: Mapping[str, Any], deployment_index: Index) -> dict[str, Any] | None:
    """What readiness is judged by: the RayService for engine ray, else the Deployment."""
    if (isvc_body.get("spec") or {}).get("engine") == "ray":
        return RAY_SERVICES.get(key)
    return _first(deployment_index, key)


# --- settings -----------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: Logger, **_: Any) -> None:
    """All kopf settings in one place."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"  # never added: no delete handlers, owners clean up
    # kopf's own bookkeeping in memory, not in annotations: no PATCH and no echo per handled object.
    settings.persistence.progress_storage = PROGRESS
    settings.persistence.diffbase_storage = DIFFBASE
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = OPERATOR
    # A watch that the server closes every 5 minutes, and a client that notices a dead one.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 32
    # After its own patch (only the retry annotation, with the bookkeeping in memory), kopf waits this
    # long for the patched version to come back through the watch before it trusts older events.
    settings.persistence.consistency_timeout = 30
    if not settings.peering.mandatory:  # --peering NAME given on the command line wins
        settings.peering.name = PEERING_NAME
    # Only our children and their pods are streamed, filtered by the API server.
    for selector in (*(kind.resource for kind in kinds.CHILD_KINDS), PODS):
        settings.watching.label_selectors[selector] = f"{MANAGED_BY}={OPERATOR}"
    get_kube()  # fail at start-up, not at the first event, when no credentials can be found
    logger.info("forkless-operator configured; runtime image %s", get_settings().runtime_image)


SCALER: list[ScalerServer] = []  # the running external scaler, if any


@kopf.on.startup()
async def start_scaler(logger: Logger, **_: Any) -> None:
    """KEDA's external scaler (autoscaling.class keda), in kopf's own event loop."""
    port = get_settings().scaler_port
    if port and not SCALER:
        server = ScalerServer(port)
        try:
            await server.start()
        except OSError as error:  # the operator's own work goes on; KEDA's triggers will say they fail
            logger.error("KEDA's external scaler is not served: %s", error)
            return
        SCALER.append(server)


@kopf.on.cleanup()
async def stop_scaler(**_: Any) -> None:
    while SCALER:
        await SCALER.pop().stop()


# --- in-memory views of what the watches have seen ----------------------------------------------


# The metadata that parsing and status computation read; not managedFields or annotations.
INDEXED_METADATA = ("name", "namespace", "uid", "generation", "labels", "deletionTimestamp")


def _metadata(body: kopf.Body) -> dict[str, Any]:
    return {key: body.metadata[key] for key in INDEXED_METADATA if key in body.metadata}


# The index functions are async, and so are the pod and child event handlers: kopf runs them in its
# event loop rather than queueing each event for a handler thread behind the reconciles, with the
# event's parsed body held meanwhile (forkless_operator.followups).
@kopf.index(*ISVC)
async def isvc_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): {"metadata": _metadata(body), "spec": dict(body.spec), "status": dict(body.status)}}


@kopf.index(*kinds.DEPLOYMENT.resource, labels=OWNED)
async def deployment_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): {"metadata": _metadata(body), "spec": {"replicas": body.spec.get("replicas", 1)},
                                "status": dict(body.status)}}


@kopf.index(*PODS, labels=OWNED)
async def pod_index(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    """Just what status computation reads of a pod, keyed by its InferenceService."""
    status = body.status
    return {
        (namespace or "", labels.get(INSTANCE, "")): {
            "metadata": {"name": body.metadata.name, "deletionTimestamp": body.metadata.get("deletionTimestamp")},
            "status": {key: status.get(key) for key in ("conditions", "containerStatuses", "initContainerStatuses")},
        }
    }


def _first(index: Index, key: Key) -> dict[str, Any] | None:
    return next(iter(index.get(key, [])), None)


def _fail_permanently(kube: Kube, body: kopf.Body, key: Key, generation: int, reason: str, message: str) -> None:
    previous = STATUS.previous(key, body.get("status"))
    status = invalid_spec_status(message, generation, previous)
    if reason != "InvalidSpec":
        for condition in status["conditions"]:
            condition["reason"] = reason
    with STATUS.lock(key):
        STATUS.write(kube.apply_status, key, status, body.get("status"))
    kopf.warn(body, reason=reason, message=message)
    metrics.REGISTRY.error(reason)
    raise kopf.PermanentError(message)


@kopf.on.resume(*ISVC)
@kopf.on.create(*ISVC)
@kopf.on.update(*ISVC, field="spec")
def reconcile(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    reason: str,
    logger: Logger,
    **kwargs: Any,
) -> None:
    """Make the children match the spec, then write the status; the same steps whatever happened."""
    started = time.monotonic()
    kube = get_kube()
    settings = get_settings()
    key = (namespace or "", name)
    pod_index: Index = kwargs["pod_index"]
    deployment_index: Index = kwargs["deployment_index"]
    generation = int(body.metadata.get("generation") or 0)
    try:
        isvc = parse(body)
    except ValidationError as error:
        _fail_permanently(kube, body, key, generation, "InvalidSpec", validation_message(error))
        return
    if not (isvc.spec.runtime.image or settings.runtime_image):
        _fail_permanently(
            kube, body, key, generation, "RuntimeImageNotConfigured",
            "spec.runtime.image must be set: the operator has no default runtime image configured",
        )
    try:
        credentials, credentials_problem = download_credentials(kube, isvc)
        CREDENTIALS[key] = credentials
        applied = apply_children(kube, isvc, APPLIED_CHILDREN, settings, prune=reason != kopf.Reason.CREATE,
                                 credentials=credentials)
        problem = credentials_problem or model_claim_problem(kube, isvc)
        _write_status(kube, body, key, isvc, generation, settings, APPLIED, problem,
                      lambda: freshest_deployment(applied.get("Deployment") or applied.get("RayService"),
                                                  _workload(key, body, deployment_index)),
                      pod_index.get(key, []))
        if credentials_problem is not None:
            raise kopf.TemporaryError(credentials_problem.message, delay=CREDENTIALS_RETRY_DELAY_S)
    except KindNotServed as missing:  # e.g. KEDA not installed: said in Ready, rechecked every minute
        _write_status(kube, body, key, isvc, generation, settings, missing.observation, missing.observation,
                      lambda: _workload(key, body, deployment_index), pod_index.get(key, []))
        raise kopf.TemporaryError(missing.observation.message, delay=NOT_SERVED_RETRY_DELAY_S) from missing
    except ApiException as error:
        metrics.REGISTRY.error(f"Api{error.status}")
        if is_retryable(error):
            raise kopf.TemporaryError(f"API server answered {error.status}: {error.reason}", delay=RETRY_DELAY_S) from error
        _fail_permanently(kube, body, key, generation, "ApplyFailed", f"children cannot be applied: {error.body}")
    except HTTPError as error:
        metrics.REGISTRY.error("Connection")
        raise kopf.TemporaryError(f"API server unreachable: {error}", delay=RETRY_DELAY_S) from error
    finally:
        metrics.REGISTRY.reconciled("done", time.monotonic() - started)
    logger.info("reconciled generation %s", generation)


def _write_status(kube: Any, body: Mapping[str, Any], key: Key, isvc: InferenceService, generation: int,
                  settings: Settings, reconciled: Observation, problem: Observation | None,
                  workload: Callable[[], Mapping[str, Any] | None], pods: Iterable[Mapping[str, Any]]) -> None:
    """The status after a reconcile (applied, or stopped by a problem), written once, and one Warning
    event when Ready turns False for a new reason.

    The workload (Deployment or RayService) is read under the status lock: an event of it handled
    meanwhile found no status to refresh (none written yet) and left its news in the index, read here."""
    STATUS.problems[key] = problem
    with STATUS.lock(key):
        previous = STATUS.previous(key, body.get("status"))
        status = compute_status(isvc, workload(), pods, generation, reconciled=reconciled, problem=problem,
                                previous=previous, settings=settings)
        STATUS.write(kube.apply_status, key, status, body.get("status"))
    warn_on_transition(body, previous, status)


# --- children: drift repair and status ----------------------------------------------------------


def warn_on_transition(isvc: Mapping[str, Any], previous: InferenceServiceStatus | None,
                       status: Mapping[str, Any]) -> None:
    """One Warning event when Ready turns False for a new problem (status.new_problem)."""
    problem = new_problem(previous, status)
    if problem is None:
        return
    metadata = isvc.get("metadata") or {}
    reference: Any = {"apiVersion": API_VERSION, "kind": kinds.INFERENCE_SERVICE.kind,
                      "metadata": {key: metadata.get(key) for key in ("name", "namespace", "uid")}}
    kopf.warn(reference, reason=problem.reason, message=problem.message)


def _owner(body: kopf.Body) -> str | None:
    for reference in body.metadata.get("ownerReferences", []):
        if reference.get("controller") and reference.get("apiVersion") == API_VERSION:
            return str(reference.get("name"))
    return None


def refresh_status(
    key: Key,
    isvc_body: Mapping[str, Any],
    workload: Callable[[], Mapping[str, Any] | None],
    pods: Iterable[Mapping[str, Any]],
) -> None:
    """Recompute the status from the children as they are now; write it only if it changed.

    ``workload`` (the Deployment or RayService) is read under the status lock: of two threads that
    refresh one InferenceService, the one that writes last has read the newest view.
    """
    try:
        isvc = parse(isvc_body)
    except ValidationError:
        return  # reconcile already wrote InvalidSpec
    stored = isvc_body.get("status")
    with STATUS.lock(key):
        previous = STATUS.previous(key, stored)
        if previous is None or previous.observed_generation is None:
            return  # not reconciled yet: reconcile writes the first status
        status = compute_status(
            isvc, workload(), pods, previous.observed_generation,
            problem=STATUS.problems.get(key), previous=previous, settings=get_settings(),
        )
        STATUS.write(get_kube().apply_status, key, status, stored)
    warn_on_transition(isvc_body, previous, status)


@dataclass(frozen=True)
class Indexes:
    """kopf's indexes, as handed to every handler (the same live views for the operator's life)."""

    isvc: Index
    deployment: Index
    pod: Index

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        return cls(kwargs["isvc_index"], kwargs["deployment_index"], kwargs["pod_index"])


@dataclass(frozen=True)
class Asked:
    """What the events of one InferenceService's children and pods asked for since its last follow-up."""

    repair: bool  # a child drifted: apply the children again
    refresh: bool  # the workload or a pod changed: recompute the status
    indexes: Indexes
    # The handler's context: kopf.warn posts events through kopf's context variables, which a thread
    # of our own lacks (events would be dropped without a word).
    context: contextvars.Context = field(default_factory=contextvars.copy_context)

    def merged(self, newer: Asked) -> Asked:
        return Asked(self.repair or newer.repair, self.refresh or newer.refresh, newer.indexes, newer.context)


def follow_up(key: Key, asked: Asked) -> None:
    """Repair and refresh one InferenceService as its children are now (in a FOLLOW_UPS thread), in the
    context of the handler that asked."""
    asked.context.run(_follow_up, key, asked)


def _follow_up(key: Key, asked: Asked) -> None:
    isvc_body = _first(asked.indexes.isvc, key)
    if isvc_body is None or isvc_body["metadata"].get("deletionTimestamp"):
        return  # the owner is gone or going: the garbage collector removes the children
    try:
        if asked.repair:
            apply_children(get_kube(), parse(isvc_body), APPLIED_CHILDREN, get_settings(), prune=False,
                           credentials=CREDENTIALS.get(key, NO_CREDENTIALS))
        if asked.refresh:
            refresh_status(key, isvc_body, lambda: _workload(key, isvc_body, asked.indexes.deployment),
                           asked.indexes.pod.get(key, []))
    except (ApiException, HTTPError, ValidationError) as error:
        metrics.REGISTRY.error("FollowUp")
        log.warning("cannot repair or refresh %s/%s: %s", *key, error)


FOLLOW_UPS: FollowUps[Key, Asked] = FollowUps(follow_up, Asked.merged)
FOLLOW_UP_THREADS = 4


@kopf.on.startup()
def start_follow_ups(**_: Any) -> None:
    FOLLOW_UPS.start(FOLLOW_UP_THREADS)


@kopf.on.cleanup()
def stop_follow_ups(**_: Any) -> None:
    FOLLOW_UPS.stop()


def on_child_event(kind: str, event_type: str | None, body: kopf.Body, namespace: str | None,
                   kwargs: Mapping[str, Any]) -> None:
    """An event of a child: repair it if someone else changed it; a Deployment's or RayService's also
    refreshes the status. Decided here, done by FOLLOW_UPS."""
    indexes = Indexes.of(kwargs)
    owner = _owner(body)
    if owner is None:
        return
    key = (namespace or "", owner)
    isvc_body = _first(indexes.isvc, key)
    if isvc_body is None or isvc_body["metadata"].get("deletionTimestamp"):
        return  # the owner is gone or going: the garbage collector removes the children
    child = kinds.child_of(kind, str(body.metadata.get("name", "")), owner)
    if child is None:
        return  # owned, but no child the operator renders (left over from an older version): nothing to repair
    repair = APPLIED_CHILDREN.needs_repair(child.role, key, event_type, body)
    if repair:
        kwargs["logger"].warning("%s %s/%s drifted from what the operator applied; applying it again", kind, *key)
        metrics.REGISTRY.error("Drift")
    if kind == kinds.RAY_SERVICE.kind:
        if event_type == "DELETED":
            RAY_SERVICES.forget(key)
        else:
            RAY_SERVICES.remember(key, body)
    refresh = kind in (kinds.DEPLOYMENT.kind, kinds.RAY_SERVICE.kind)
    if repair or refresh:
        FOLLOW_UPS.request(key, Asked(repair, refresh, indexes))


def _watch_child(child: kinds.Kind) -> None:
    """One event handler per child kind (kinds.CHILD_KINDS), all doing the same."""

    async def on_event(type: str | None, body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
        on_child_event(child.kind, type, body, namespace, kwargs)

    kopf.on.event(*child.resource, labels=OWNED, id=f"{child.kind.lower()}_event")(on_event)


for _kind in kinds.CHILD_KINDS:
    _watch_child(_kind)


def resync_ray_service(key: Key, isvc_index: Index, pod_index: Index, logger: Logger) -> None:
    """Read an engine ray InferenceService's RayService directly; refresh the status if it is news.

    kopf starts watching a kind when a CRD event finds it in discovery. KubeRay's CRDs installed
    while the operator runs are Established before discovery lists them, often enough that kopf
    never watches RayServices until a restart, and Ready would stay at RayInitializing. One GET per
    Ray InferenceService per RAY_RESYNC_S keeps the status true either way; it writes only news.
    """
    isvc_body = _first(isvc_index, key)
    if isvc_body is None:
        return
    try:
        rayservice = get_kube().get(kinds.RAY_SERVICE.api_version, kinds.RAY_SERVICE.kind, *key)
        if rayservice is not None and RAY_SERVICES.remember(key, rayservice):
            refresh_status(key, isvc_body, lambda: RAY_SERVICES.get(key), pod_index.get(key, []))
    except (ApiException, HTTPError) as error:
        metrics.REGISTRY.error("RayResync")
        logger.warning("cannot read the RayService of %s/%s: %s", *key, error)


@kopf.daemon(*ISVC, when=lambda spec, **_: spec.get("engine") == "ray", cancellation_timeout=5)
async def follow_ray_service(namespace: str | None, name: str, stopped: kopf.DaemonStopped, logger: Logger,
                             **kwargs: Any) -> None:
    """resync_ray_service every RAY_RESYNC_S while the InferenceService is engine ray.

    A daemon rather than a timer: kopf logs every timer run at INFO, which says nothing here.
    """
    key = (namespace or "", name)
    while not await stopped.wait(RAY_RESYNC_S):
        await asyncio.to_thread(resync_ray_service, key, kwargs["isvc_index"], kwargs["pod_index"], logger)


@kopf.on.event(*PODS, labels=OWNED)
async def pod_event(namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
    """A pod was scheduled, failed to pull, crashed or became ready: recompute the owner's status."""
    key = (namespace or "", labels.get(INSTANCE, ""))
    indexes = Indexes.of(kwargs)
    if _first(indexes.isvc, key) is not None:
        FOLLOW_UPS.request(key, Asked(repair=False, refresh=True, indexes=indexes))


@kopf.on.event(*ISVC)
async def forget_deleted(type: str | None, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
    """Drop what the operator remembers of a deleted InferenceService.

    Async because it runs for every event of every InferenceService and does nothing for most:
    in the event loop it costs no hop to the handler threads.
    """
    if type == "DELETED":
        key = (namespace or "", name)
        STATUS.forget(key)
        APPLIED_CHILDREN.forget(key)
        CREDENTIALS.pop(key, None)
        RAY_SERVICES.forget(key)
        PROGRESS.forget(str(body.metadata.get("uid", "")))
        DIFFBASE.forget(str(body.metadata.get("uid", "")))
