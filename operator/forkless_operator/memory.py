"""kopf's bookkeeping kept in this process instead of on the objects.

By default kopf remembers the last handled spec ("diff base") and each handler's progress in
annotations, so every handled create or update costs a PATCH of the object, a watch event back,
and a wait until that event arrives (kopf's consistency timeout) before the object's next event
is handled. The operator's reconcile is level-based and idempotent, so it needs none of it to
survive a restart: a restarted operator sees every object as new and reconciles it again, which is
what its resume handler does anyway. In memory, a burst of creations costs one request less per
object, no echo events and no waiting; and the objects carry no kopf annotations (but one, while a
failed reconcile waits for its retry).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import kopf

from forkless_operator.spec import GROUP

RETRY_ANNOTATION = f"{GROUP}/retry"


def _uid(body: kopf.Body) -> str:
    return str(body.metadata.get("uid", ""))


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """The spec each object was last handled with, by uid."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._essences: dict[str, Any] = {}

    def fetch(self, *, body: kopf.Body) -> Any:
        with self._lock:
            return self._essences.get(_uid(body))

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        with self._lock:
            self._essences[_uid(body)] = essence

    def forget(self, uid: str) -> None:
        with self._lock:
            self._essences.pop(uid, None)


class MemoryProgressStorage(kopf.ProgressStorage):
    """Each handler's progress (retries, success) on each object, by uid."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], kopf.ProgressRecord] = {}

    def fetch(self, *, key: Any, body: kopf.Body) -> kopf.ProgressRecord | None:
        with self._lock:
            return self._records.get((_uid(body), str(key)))

    def store(self, *, key: Any, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch) -> None:
        with self._lock:
            self._records[(_uid(body), str(key))] = copy.deepcopy(record)

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        with self._lock:
            self._records.pop((_uid(body), str(key)), None)

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        """kopf retries a failed handler by touching the object after the delay, to get an event of it:
        that one annotation stays a real write (it happens only on a retry), and is removed again."""
        if value is not None:
            patch.metadata.annotations[RETRY_ANNOTATION] = value
        elif RETRY_ANNOTATION in body.metadata.annotations:
            patch.metadata.annotations[RETRY_ANNOTATION] = None

    def clear(self, *, essence: Any) -> Any:
        return copy.deepcopy(essence)

    def forget(self, uid: str) -> None:
        with self._lock:
            for record_key in [k for k in self._records if k[0] == uid]:
                del self._records[record_key]
