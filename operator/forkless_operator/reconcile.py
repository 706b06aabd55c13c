"""The steps of a reconcile, without kopf: parse, apply the children, look for problems, and pick the
Deployment view that status is computed from. The handlers call these; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forkless_runtime.storage.uris import parse_model_uri
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from forkless_operator import kinds
from forkless_operator.apply import Kube
from forkless_operator.credentials import (
    NO_CREDENTIALS,
    STORAGE_SECRET_ANNOTATION,
    StorageCredentials,
    secret_names,
    storage_credentials,
)
from forkless_operator.drift import AppliedChildren
from forkless_operator.render import render_children
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService
from forkless_operator.status import Observation


def parse(body: Mapping[str, Any]) -> InferenceService:
    """The typed InferenceService; ValidationError when its spec breaks a rule of the API."""
    return InferenceService.model_validate({"metadata": body.get("metadata", {}), "spec": body.get("spec", {})})


def validation_message(error: ValidationError) -> str:
    """'spec.runtime.workers: workers must be at least 1; ...' for a Ready=False message."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
    )


class KindNotServed(Exception):
    """A child's kind is not served by this cluster (KEDA's ScaledObject without KEDA)."""

    def __init__(self, observation: Observation) -> None:
        super().__init__(observation.message)
        self.observation = observation


# Kinds that another project installs, and what their absence means for the user.
NOT_SERVED = {
    "ScaledObject": Observation(False, "KEDANotInstalled",
                                "autoscaling.class keda needs KEDA (scaledobjects.keda.sh is not served by this "
                                "cluster): install KEDA, or use class hpa or external"),
    "RayService": Observation(False, "KubeRayNotInstalled",
                              "engine ray needs the KubeRay operator (rayservices.ray.io is not served by this "
                              "cluster): install KubeRay v1.5 or later, or use engine deployment"),
}


def apply_children(kube: Kube, isvc: InferenceService, applied: AppliedChildren, settings: Settings,
                   *, prune: bool, credentials: StorageCredentials = NO_CREDENTIALS) -> dict[str, Any]:
    """Server-side apply every rendered child, in kinds.CHILDREN order, and remember what was applied.

    With ``prune``, the optional children no longer rendered are deleted first: an HPA must be gone
    before KEDA is given the same Deployment (two autoscalers would fight over it). A new
    InferenceService has nothing to prune, which saves requests per create. Returns the objects as
    applied; raises KindNotServed when a child's kind is not installed.
    """
    key = (isvc.metadata.namespace, isvc.metadata.name)
    result: dict[str, Any] = {}
    children = render_children(isvc, settings, credentials)
    for child in kinds.CHILDREN:
        if children[child.role] is None:
            applied.forget_child(child.role, key)
            if prune:
                kube.delete(child.kind.api_version, child.kind.kind, key[0], child.name(key[1]))
    for child in kinds.CHILDREN:
        manifest = children[child.role]
        if manifest is None:
            continue
        try:
            result[child.role] = kube.apply(manifest)
        except ApiException as error:
            if error.status == 404 and child.role in NOT_SERVED:
                raise KindNotServed(NOT_SERVED[child.role]) from error
            raise
        applied.remember(child.role, key, manifest, result[child.role])
    return result


def model_claim_problem(kube: Kube, isvc: InferenceService) -> Observation | None:
    """A pvc:// model or a cache whose claim does not exist: Ready=False with the reason, not a retry loop."""
    model = isvc.spec.model
    claims: list[tuple[str, str, str]] = []
    if model.uri.startswith("pvc://"):
        claims.append((model.uri.removeprefix("pvc://").split("/", 1)[0], "ModelClaimNotFound", "the model is read from it"))
    if model.cache is not None:
        claims.append((model.cache.claim_name, "ModelCacheClaimNotFound", "model.cache keeps downloads on it"))
    for claim, reason, why in claims:
        if kube.get(kinds.PVC.api_version, kinds.PVC.kind, isvc.metadata.namespace, claim) is None:
            message = f'persistentvolumeclaim "{claim}" must exist in namespace {isvc.metadata.namespace}: {why}'
            return Observation(False, reason, message)
    return None


def download_credentials(kube: Kube, isvc: InferenceService) -> tuple[StorageCredentials, Observation | None]:
    """The download init container's credentials, read as KServe reads them, and what is missing.

    Only a downloaded model needs them. A ServiceAccount or Secret that does not exist (or that the
    operator may not read) is a Ready=False reason naming it; the pods are still rendered, with the
    references they can resolve, so they start as soon as the Secret appears.
    """
    if not parse_model_uri(isvc.spec.model.uri).downloaded:
        return NO_CREDENTIALS, None
    namespace = isvc.metadata.namespace
    account_name = isvc.spec.service_account_name
    account = None
    if account_name:
        account = _read(kube, kinds.SERVICE_ACCOUNT, namespace, account_name)
        if account is None:
            return NO_CREDENTIALS, Observation(
                False, "ServiceAccountNotFound",
                f'serviceaccount "{account_name}" must exist in namespace {namespace}: '
                "the pods run as it and the model download reads its Secrets",
            )
    secrets: list[dict[str, Any]] = []
    missing: list[str] = []
    for name in secret_names(isvc.metadata.annotations, account):
        secret = _read(kube, kinds.SECRET, namespace, name)
        if secret is None:
            missing.append(name)
        else:
            secrets.append(secret)
    credentials = storage_credentials(secrets, account)
    if not missing:
        return credentials, None
    listed_by = (f'listed by serviceaccount "{account_name}"' if STORAGE_SECRET_ANNOTATION not in isvc.metadata.annotations
                 else f"named by the {STORAGE_SECRET_ANNOTATION} annotation")
    names = ", ".join(f'"{name}"' for name in missing)
    return credentials, Observation(
        False, "StorageSecretNotFound",
        f"secret {names} ({listed_by}) must exist in namespace {namespace} and be readable by the operator: "
        "the model download takes its credentials from it",
    )


def _read(kube: Kube, kind: kinds.Kind, namespace: str, name: str) -> dict[str, Any] | None:
    """The object, or None when it is missing or the operator may not read it (403)."""
    try:
        return kube.get(kind.api_version, kind.kind, namespace, name)
    except ApiException as error:
        if error.status == 403:
            return None
        raise


def freshest_deployment(
    applied: Mapping[str, Any] | None, indexed: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The Deployment a reconcile judges readiness by: the watch's view when it has the applied generation.

    The apply response carries the status as it was when the spec was applied. Under load the
    Deployment can become available before the reconcile writes its first status; the watch events
    that said so reached the status refresh while there was no status yet, and were dropped. The
    index already holds what they carried (kopf indexes an event before its handlers run), so it is
    read under the status lock; any event indexed later finds the status written and refreshes it.
    """
    if applied is None or indexed is None:
        return applied or indexed
    same_generation = indexed.get("metadata", {}).get("generation") == applied.get("metadata", {}).get("generation")
    return indexed if same_generation else applied
