"""Every kopf decorator of the operator, and nothing else of substance.

One level-based ``reconcile`` for create, update (of spec) and resume: parse,
render, server-side apply, compute status, write it through /status. The
children's watch events repair drift (a deleted or edited child is applied
again) and keep the status current. The handlers are synchronous: kopf runs
them in its thread pool, and the ``kubernetes`` client is synchronous too.

Loops cannot happen: status writes do not touch ``spec``, and ``reconcile``
reacts to ``spec`` alone; a child is re-applied only when it differs from what
the operator last applied (a newer generation, or resourceVersion for kinds
without one, or a label or annotation of ours changed), and an apply that
changes nothing changes neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from forkless_operator import metrics
from forkless_operator.apply import Kube, get_kube, is_retryable
from forkless_operator.render import CHILD_KINDS, render_children
from forkless_operator.settings import get_settings
from forkless_operator.spec import API_VERSION, GROUP, PLURAL, InferenceService, InferenceServiceStatus
from forkless_operator.status import APPLIED, Observation, compute_status, invalid_spec_status

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
OPERATOR = "forkless-operator"
OWNED = {MANAGED_BY: OPERATOR}
RETRY_DELAY_S = 10
PEERING_NAME = "forkless-operator"

ISVC = (API_VERSION, PLURAL)
CHILD_RESOURCES = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
}
PODS = ("v1", "pods")

Key = tuple[str, str]
Logger = logging.Logger | logging.LoggerAdapter[Any]
Index = kopf.Index[Key, dict[str, Any]]


# --- settings -----------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: Logger, **_: Any) -> None:
    """All kopf settings in one place."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"  # never added: no delete handlers, owners clean up
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = OPERATOR
    # A watch that the server closes every 5 minutes, and a client that notices a dead one.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 32
    # After its own patch (the diff-base annotation), kopf waits this long for the patched version to
    # come back through the watch before it trusts older events. Under a burst the watch lags more
    # than the default 5 s, and a stale event without the annotation re-ran the create handler.
    settings.persistence.consistency_timeout = 30
    if not settings.peering.mandatory:  # --peering NAME given on the command line wins
        settings.peering.name = PEERING_NAME
    # Only our children and their pods are streamed, filtered by the API server.
    for selector in (*CHILD_RESOURCES.values(), PODS):
        settings.watching.label_selectors[selector] = f"{MANAGED_BY}={OPERATOR}"
    get_kube()  # fail at start-up, not at the first event, when no credentials can be found
    logger.info("forkless-operator configured; runtime image %s", get_settings().runtime_image)


# --- in-memory views of what the watches have seen ----------------------------------------------


# The metadata that parsing and status computation read; not managedFields or annotations.
INDEXED_METADATA = ("name", "namespace", "uid", "generation", "labels", "deletionTimestamp")


def _metadata(body: kopf.Body) -> dict[str, Any]:
    return {key: body.metadata[key] for key in INDEXED_METADATA if key in body.metadata}


@kopf.index(*ISVC)
def isvc_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): {"metadata": _metadata(body), "spec": dict(body.spec), "status": dict(body.status)}}


@kopf.index(*CHILD_RESOURCES["Deployment"], labels=OWNED)
def deployment_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): {"metadata": _metadata(body), "spec": {"replicas": body.spec.get("replicas", 1)},
                                "status": dict(body.status)}}


@kopf.index(*PODS, labels=OWNED)
def pod_index(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
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


class StatusBook:
    """Serializes the status writes of each InferenceService and remembers the last one.

    A pod event and a reconcile of the same InferenceService run in different
    threads; the lock keeps one from writing a status computed from the other's
    stale view, and the memory makes identical recomputations write nothing.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = defaultdict(threading.Lock)
        self._written: dict[Key, dict[str, Any]] = {}
        self.problems: dict[Key, Observation | None] = {}
        self.applied: dict[tuple[str, Key], Applied] = {}

    def lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def previous(self, key: Key, stored: Mapping[str, Any] | None) -> InferenceServiceStatus | None:
        status = self._written.get(key) or stored
        if not status:
            return None
        try:
            return InferenceServiceStatus.model_validate(status)
        except ValidationError:
            return None  # a status this version does not understand is recomputed from scratch

    def write(self, kube: Kube, key: Key, status: dict[str, Any], stored: Mapping[str, Any] | None) -> None:
        if status == (self._written.get(key) or stored):
            return
        kube.apply_status(key[0], key[1], status)
        self._written[key] = status
        metrics.REGISTRY.status_written()

    def forget(self, key: Key) -> None:
        with self._guard:
            self._locks.pop(key, None)
        self._written.pop(key, None)
        self.problems.pop(key, None)
        for kind in CHILD_RESOURCES:
            self.applied.pop((kind, key), None)


BOOK = StatusBook()


@dataclass(frozen=True)
class Applied:
    """What the operator last applied to a child: enough to tell someone else's edit from an echo."""

    generation: int | None
    resource_version: str
    metadata: frozenset[tuple[str, str, str]]  # ("label"|"annotation", key, value) the operator sets


def _our_metadata(manifest: Mapping[str, Any]) -> frozenset[tuple[str, str, str]]:
    meta = manifest.get("metadata", {})
    return frozenset(
        [("label", k, v) for k, v in (meta.get("labels") or {}).items()]
        + [("annotation", k, v) for k, v in (meta.get("annotations") or {}).items()]
    )


def _applied_state(manifest: Mapping[str, Any], response: Mapping[str, Any]) -> Applied:
    meta = response.get("metadata", {})
    generation = meta.get("generation")
    return Applied(int(generation) if generation is not None else None, str(meta.get("resourceVersion", "")),
                   _our_metadata(manifest))


def _drifted(known: Applied, body: Mapping[str, Any]) -> bool:
    """Someone else changed the child: our labels/annotations differ, or its spec moved past ours.

    Only a NEWER generation counts, so late events from before the operator's own repair (the
    Deployment controller's status updates of the edited generation) do not trigger another apply.
    Kinds without a generation (Service) fall back to the resourceVersion.
    """
    meta = body.get("metadata", {})
    if not known.metadata <= _our_metadata(body):
        return True
    generation = meta.get("generation")
    if known.generation is not None and generation is not None:
        return int(generation) > known.generation
    return str(meta.get("resourceVersion", "")) != known.resource_version


# --- reconcile ----------------------------------------------------------------------------------


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
    )


def _parse(body: Mapping[str, Any]) -> InferenceService:
    return InferenceService.model_validate(
        {"metadata": body.get("metadata", {}), "spec": body.get("spec", {})}
    )


def apply_children(kube: Kube, isvc: InferenceService, *, prune: bool) -> dict[str, Any]:
    """Server-side apply every rendered child; with ``prune``, delete the optional ones no longer rendered.

    A new InferenceService has nothing to prune, which saves two requests per create.
    """
    key = (isvc.metadata.namespace, isvc.metadata.name)
    applied: dict[str, Any] = {}
    children = render_children(isvc, get_settings())
    for api_version, kind in CHILD_KINDS:
        manifest = children[kind]
        if manifest is None:
            BOOK.applied.pop((kind, key), None)
            if prune:
                kube.delete(api_version, kind, *key)
            continue
        applied[kind] = kube.apply(manifest)
        BOOK.applied[(kind, key)] = _applied_state(manifest, applied[kind])
    return applied


def model_claim_problem(kube: Kube, isvc: InferenceService, body: kopf.Body) -> Observation | None:
    """A pvc:// model whose claim does not exist: Ready=False and a Warning, not a retry loop."""
    uri = isvc.spec.model.uri
    if not uri.startswith("pvc://"):
        return None
    claim = uri.removeprefix("pvc://").split("/", 1)[0]
    if kube.get("v1", "PersistentVolumeClaim", isvc.metadata.namespace, claim) is not None:
        return None
    message = (
        f'persistentvolumeclaim "{claim}" must exist in namespace {isvc.metadata.namespace}: '
        "the model is read from it"
    )
    kopf.warn(body, reason="ModelClaimNotFound", message=message)
    return Observation(False, "ModelClaimNotFound", message)


def _fail_permanently(kube: Kube, body: kopf.Body, key: Key, generation: int, reason: str, message: str) -> None:
    previous = BOOK.previous(key, body.get("status"))
    status = invalid_spec_status(message, generation, previous)
    if reason != "InvalidSpec":
        for condition in status["conditions"]:
            condition["reason"] = reason
    with BOOK.lock(key):
        BOOK.write(kube, key, status, body.get("status"))
    kopf.warn(body, reason=reason, message=message)
    metrics.REGISTRY.error(reason)
    raise kopf.PermanentError(message)


def freshest_deployment(
    applied: Mapping[str, Any] | None, indexed: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The Deployment a reconcile judges readiness by: the watch's view when it has the applied generation.

    The apply response carries the status as it was when the spec was applied. Under load the
    Deployment can become available before the reconcile writes its first status; the watch events
    that said so reached ``refresh_status`` while there was no status yet, and were dropped. The
    index already holds what they carried (kopf indexes an event before its handlers run), so it is
    read under the status lock; any event indexed later finds the status written and refreshes it.
    """
    if applied is None or indexed is None:
        return applied or indexed
    same_generation = indexed.get("metadata", {}).get("generation") == applied.get("metadata", {}).get("generation")
    return indexed if same_generation else applied


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
    key = (namespace or "", name)
    pod_index: Index = kwargs["pod_index"]
    deployment_index: Index = kwargs["deployment_index"]
    generation = int(body.metadata.get("generation") or 0)
    try:
        isvc = _parse(body)
    except ValidationError as error:
        _fail_permanently(kube, body, key, generation, "InvalidSpec", _validation_message(error))
        return
    if not (isvc.spec.runtime.image or get_settings().runtime_image):
        _fail_permanently(
            kube, body, key, generation, "RuntimeImageNotConfigured",
            "spec.runtime.image must be set: the operator has no default runtime image configured",
        )
    try:
        applied = apply_children(kube, isvc, prune=reason != kopf.Reason.CREATE)
        problem = model_claim_problem(kube, isvc, body)
        BOOK.problems[key] = problem
        with BOOK.lock(key):
            status = compute_status(
                isvc,
                freshest_deployment(applied.get("Deployment"), _first(deployment_index, key)),
                pod_index.get(key, []),
                generation,
                reconciled=APPLIED,
                problem=problem,
                previous=BOOK.previous(key, body.get("status")),
                settings=get_settings(),
            )
            BOOK.write(kube, key, status, body.get("status"))
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


# --- children: drift repair and status ----------------------------------------------------------


def _owner(body: kopf.Body) -> str | None:
    for reference in body.metadata.get("ownerReferences", []):
        if reference.get("controller") and reference.get("apiVersion") == API_VERSION:
            return str(reference.get("name"))
    return None


def refresh_status(
    key: Key,
    isvc_body: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
) -> None:
    """Recompute the status from the children as they are now; write it only if it changed."""
    try:
        isvc = _parse(isvc_body)
    except ValidationError:
        return  # reconcile already wrote InvalidSpec
    stored = isvc_body.get("status")
    with BOOK.lock(key):
        previous = BOOK.previous(key, stored)
        if previous is None or previous.observed_generation is None:
            return  # not reconciled yet: reconcile writes the first status
        status = compute_status(
            isvc, deployment, pods, previous.observed_generation,
            problem=BOOK.problems.get(key), previous=previous, settings=get_settings(),
        )
        BOOK.write(get_kube(), key, status, stored)


def _on_child_event(
    kind: str,
    event_type: str | None,
    body: kopf.Body,
    namespace: str | None,
    kwargs: Mapping[str, Any],
) -> None:
    isvc_index: Index = kwargs["isvc_index"]
    deployment_index: Index = kwargs["deployment_index"]
    pod_index: Index = kwargs["pod_index"]
    logger: Logger = kwargs["logger"]
    owner = _owner(body)
    if owner is None:
        return
    key = (namespace or "", owner)
    isvc_body = _first(isvc_index, key)
    if isvc_body is None or isvc_body["metadata"].get("deletionTimestamp"):
        return  # the owner is gone or going: the garbage collector removes the children
    known = BOOK.applied.get((kind, key))
    drifted = event_type == "DELETED" or (known is not None and _drifted(known, body))
    try:
        if drifted and known is not None:
            logger.warning("%s %s/%s drifted from what the operator applied; applying it again", kind, *key)
            metrics.REGISTRY.error("Drift")
            apply_children(get_kube(), _parse(isvc_body), prune=False)
        if kind == "Deployment":
            deployment = None if event_type == "DELETED" else _first(deployment_index, key)
            refresh_status(key, isvc_body, deployment, pod_index.get(key, []))
    except (ApiException, HTTPError, ValidationError) as error:
        metrics.REGISTRY.error("ChildEvent")
        logger.warning("cannot handle the %s event of %s/%s: %s", kind, *key, error)


@kopf.on.event(*CHILD_RESOURCES["Deployment"], labels=OWNED)
def deployment_event(type: str | None, body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
    _on_child_event("Deployment", type, body, namespace, kwargs)


@kopf.on.event(*CHILD_RESOURCES["Service"], labels=OWNED)
def service_event(type: str | None, body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
    _on_child_event("Service", type, body, namespace, kwargs)


@kopf.on.event(*CHILD_RESOURCES["HorizontalPodAutoscaler"], labels=OWNED)
def hpa_event(type: str | None, body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
    _on_child_event("HorizontalPodAutoscaler", type, body, namespace, kwargs)


@kopf.on.event(*CHILD_RESOURCES["PodDisruptionBudget"], labels=OWNED)
def pdb_event(type: str | None, body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
    _on_child_event("PodDisruptionBudget", type, body, namespace, kwargs)


@kopf.on.event(*PODS, labels=OWNED)
def pod_event(namespace: str | None, labels: Mapping[str, str], logger: Logger, **kwargs: Any) -> None:
    """A pod was scheduled, failed to pull, crashed or became ready: recompute the owner's status."""
    isvc_index: Index = kwargs["isvc_index"]
    deployment_index: Index = kwargs["deployment_index"]
    pod_index: Index = kwargs["pod_index"]
    key = (namespace or "", labels.get(INSTANCE, ""))
    isvc_body = _first(isvc_index, key)
    if isvc_body is None:
        return
    try:
        refresh_status(key, isvc_body, _first(deployment_index, key), pod_index.get(key, []))
    except (ApiException, HTTPError) as error:
        metrics.REGISTRY.error("PodEvent")
        logger.warning("cannot update the status of %s/%s: %s", *key, error)


@kopf.on.event(*ISVC)
async def forget_deleted(type: str | None, namespace: str | None, name: str, **_: Any) -> None:
    """Drop what the operator remembers of a deleted InferenceService.

    Async because it runs for every event of every InferenceService and does nothing for most:
    in the event loop it costs no hop to the handler threads.
    """
    if type == "DELETED":
        BOOK.forget((namespace or "", name))
