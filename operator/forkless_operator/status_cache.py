"""The last status written for each InferenceService, and the lock that orders its writes.

A pod event and a reconcile of the same InferenceService run in different handler threads; the
per-object lock keeps one from writing a status computed from the other's stale view, and the
memory of the last write makes an identical recomputation write nothing (the status is computed,
never accumulated, so most recomputations are identical).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from forkless_operator.spec import InferenceServiceStatus
from forkless_operator.status import Observation

Key = tuple[str, str]  # (namespace, name)
StatusWriter = Callable[[str, str, dict[str, Any]], Any]  # (namespace, name, status): Kube.apply_status


class StatusCache:
    def __init__(self, on_write: Callable[[], None] = lambda: None) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = defaultdict(threading.Lock)
        self._written: dict[Key, dict[str, Any]] = {}
        self._on_write = on_write
        self.problems: dict[Key, Observation | None] = {}  # found by the last reconcile (a missing claim)

    def lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def previous(self, key: Key, stored: Mapping[str, Any] | None) -> InferenceServiceStatus | None:
        """The status last written (by this process, else as stored on the object), parsed."""
        status = self._written.get(key) or stored
        if not status:
            return None
        try:
            return InferenceServiceStatus.model_validate(status)
        except ValidationError:
            return None  # a status this version does not understand is recomputed from scratch

    def write(self, write: StatusWriter, key: Key, status: dict[str, Any], stored: Mapping[str, Any] | None) -> bool:
        """Write ``status`` unless it is what the object already has; True when it wrote."""
        if status == (self._written.get(key) or stored):
            return False
        write(key[0], key[1], status)
        self._written[key] = status
        self._on_write()
        return True

    def forget(self, key: Key) -> None:
        with self._guard:
            self._locks.pop(key, None)
        self._written.pop(key, None)
        self.problems.pop(key, None)
