"""The steps of a reconcile, without kopf: parse, apply the children, look for problems, and pick the
Deployment view that status is computed from. The handlers call these; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from forkless_operator import kinds
from forkless_operator.apply import Kube
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


def apply_children(kube: Kube, isvc: InferenceService, applied: AppliedChildren, settings: Settings,
                   *, prune: bool) -> dict[str, Any]:
    """Server-side apply every rendered child, in kinds.CHILDREN order, and remember what was applied.

    With ``prune``, the optional children no longer rendered are deleted; a new InferenceService
    has nothing to prune, which saves two requests per create. Returns the objects as applied.
    """
    key = (isvc.metadata.namespace, isvc.metadata.name)
    result: dict[str, Any] = {}
    children = render_children(isvc, settings)
    for child in kinds.CHILDREN:
        manifest = children[child.kind]
        if manifest is None:
            applied.forget_child(child.kind, key)
            if prune:
                kube.delete(child.api_version, child.kind, *key)
            continue
        result[child.kind] = kube.apply(manifest)
        applied.remember(child.kind, key, manifest, result[child.kind])
    return result


def model_claim_problem(kube: Kube, isvc: InferenceService) -> Observation | None:
    """A pvc:// model whose claim does not exist: Ready=False with the reason, not a retry loop."""
    uri = isvc.spec.model.uri
    if not uri.startswith("pvc://"):
        return None
    claim = uri.removeprefix("pvc://").split("/", 1)[0]
    if kube.get(kinds.PVC.api_version, kinds.PVC.kind, isvc.metadata.namespace, claim) is not None:
        return None
    message = (
        f'persistentvolumeclaim "{claim}" must exist in namespace {isvc.metadata.namespace}: '
        "the model is read from it"
    )
    return Observation(False, "ModelClaimNotFound", message)


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
