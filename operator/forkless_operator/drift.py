"""Drift: telling someone else's edit of a child from the echo of the operator's own apply.

The operator remembers, per child, the generation (or resourceVersion) its last apply produced
and the labels and annotations it set. A watch event of that child is drift when it is a
deletion, when a label or annotation of ours changed, or when the child's spec moved past ours.
Only a NEWER generation counts, so late events from before the operator's own repair (the
Deployment controller's status updates of the edited generation) do not trigger another apply;
kinds without a generation (Service) fall back to the resourceVersion.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forkless_operator import kinds

Key = tuple[str, str]  # (namespace, name) of the InferenceService


@dataclass(frozen=True)
class Applied:
    """What the operator last applied to a child: enough to tell someone else's edit from an echo."""

    generation: int | None
    resource_version: str
    metadata: frozenset[tuple[str, str, str]]  # ("label"|"annotation", key, value) the operator sets


def our_metadata(manifest: Mapping[str, Any]) -> frozenset[tuple[str, str, str]]:
    meta = manifest.get("metadata", {})
    return frozenset(
        [("label", k, v) for k, v in (meta.get("labels") or {}).items()]
        + [("annotation", k, v) for k, v in (meta.get("annotations") or {}).items()]
    )


def applied_state(manifest: Mapping[str, Any], response: Mapping[str, Any]) -> Applied:
    meta = response.get("metadata", {})
    generation = meta.get("generation")
    return Applied(int(generation) if generation is not None else None, str(meta.get("resourceVersion", "")),
                   our_metadata(manifest))


def drifted(known: Applied, body: Mapping[str, Any]) -> bool:
    """Someone else changed the child: our labels/annotations differ, or its spec moved past ours."""
    meta = body.get("metadata", {})
    if not known.metadata <= our_metadata(body):
        return True
    generation = meta.get("generation")
    if known.generation is not None and generation is not None:
        return int(generation) > known.generation
    return str(meta.get("resourceVersion", "")) != known.resource_version


class AppliedChildren:
    """What the operator last applied to each child of each InferenceService (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._applied: dict[tuple[str, Key], Applied] = {}  # (child role, InferenceService) -> applied

    def remember(self, role: str, key: Key, manifest: Mapping[str, Any], response: Mapping[str, Any]) -> None:
        with self._lock:
            self._applied[(role, key)] = applied_state(manifest, response)

    def forget_child(self, role: str, key: Key) -> None:
        with self._lock:
            self._applied.pop((role, key), None)

    def forget(self, key: Key) -> None:
        with self._lock:
            for child in kinds.CHILDREN:
                self._applied.pop((child.role, key), None)

    def needs_repair(self, role: str, key: Key, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """A child this operator applied was deleted or changed by someone else."""
        with self._lock:
            known = self._applied.get((role, key))
        return known is not None and (event_type == "DELETED" or drifted(known, body))
