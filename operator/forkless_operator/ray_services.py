"""The RayService of each engine ray InferenceService as last seen, from two sources that may race.

KubeRay's objects reach the operator through kopf's watch and through a periodic direct read
(handlers.resync_ray_service). Either may deliver an older version after a newer one (an event
queued before a GET that returned later); the store keeps the newest by resourceVersion, so the
status never steps back to a state the RayService has already left.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

Key = tuple[str, str]


def _is_older(candidate: str, known: str) -> bool:
    """Whether ``candidate`` is an older resourceVersion than ``known``.

    resourceVersions are opaque by contract; the API server's are etcd revisions, integers that
    grow. Anything that is not an integer is taken as news rather than guessed at.
    """
    return candidate.isdigit() and known.isdigit() and int(candidate) < int(known)


class RayServices:
    """The last-seen RayService per InferenceService: generation, resourceVersion and status only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Key, dict[str, Any]] = {}

    def remember(self, key: Key, body: Mapping[str, Any]) -> bool:
        """Keep ``body`` unless a newer version is known; True when it is news (a new resourceVersion)."""
        metadata = body.get("metadata") or {}
        version = str(metadata.get("resourceVersion") or "")
        with self._lock:
            known = self._seen.get(key)
            known_version = str((known or {}).get("metadata", {}).get("resourceVersion") or "")
            if known is not None and (version == known_version or _is_older(version, known_version)):
                return False
            self._seen[key] = {
                "metadata": {"generation": metadata.get("generation"), "resourceVersion": version},
                "status": dict(body.get("status") or {}),
            }
            return True

    def get(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self._seen.get(key)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._seen.pop(key, None)
