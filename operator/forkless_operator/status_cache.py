"""The last status computed for each InferenceService, the lock that orders its writes, and the rule
that decides when a new one is written.

A pod event and a reconcile of the same InferenceService run in different handler threads; the
per-object lock keeps one from writing a status computed from the other's stale view, and the
memory of the last status makes an identical recomputation write nothing (status is computed,
never accumulated, so most recomputations are identical).

A status whose meaning changed (observedGeneration, or a condition's status or reason, the reasons
on the ordinary way to Ready counting as one) is written at once: that is what kubectl wait, Argo CD
and users act on. A change of counts or messages only
("0 of 1 replicas available" while Progressing) waits up to `DEFER_S` for the next change and is
written with it, or alone when that time is up: while a Deployment rolls out, its status moves
several times a second, and each write is a request and a watch event for every client. 60 s is
longer than a pod takes to become ready even under a burst of 1000 creations on a small cluster
(bench/operator_scale.py), so a new InferenceService is written twice (reconciled, then Ready),
and a stuck rollout's counts are still at most a minute old.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from forkless_operator.spec import InferenceServiceStatus
from forkless_operator.status import ON_THE_WAY_REASONS, Observation

log = logging.getLogger("forkless.status")

Key = tuple[str, str]  # (namespace, name)
StatusWriter = Callable[[str, str, dict[str, Any]], Any]  # (namespace, name, status): Kube.apply_status
DEFER_S = 60.0
ON_THE_WAY = "OnTheWay"
RETRY_S = 2.0


def meaning(status: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What readers act on: the observed generation and each condition's status and reason, the
    reasons of the ordinary way to Ready (Pending, DeploymentMissing, Progressing) taken as one:
    a pod going from Pending to Progressing on its way to Available is a detail, not news."""
    status = status or {}
    conditions = tuple((c.get("type"), c.get("status"), ON_THE_WAY if c.get("reason") in ON_THE_WAY_REASONS
                        else c.get("reason")) for c in status.get("conditions") or [])
    return status.get("observedGeneration"), conditions


class StatusCache:
    def __init__(self, on_write: Callable[[], None] = lambda: None, defer_s: float = DEFER_S,
                 clock: Callable[[], float] = time.monotonic, background: bool = True) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = defaultdict(threading.Lock)
        self._written: dict[Key, dict[str, Any]] = {}
        self._pending: dict[Key, tuple[dict[str, Any], StatusWriter]] = {}
        self._due: list[tuple[float, Key]] = []  # heap of (when, key) for pending statuses
        self._wake = threading.Condition(self._guard)
        self._on_write = on_write
        self._defer_s = defer_s
        self._clock = clock
        self._background = background
        self._flusher: threading.Thread | None = None
        self.problems: dict[Key, Observation | None] = {}  # found by the last reconcile (a missing claim)

    def lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def _latest(self, key: Key, stored: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        pending = self._pending.get(key)
        return pending[0] if pending else (self._written.get(key) or stored)

    def previous(self, key: Key, stored: Mapping[str, Any] | None) -> InferenceServiceStatus | None:
        """The status last computed (by this process, else as stored on the object), parsed."""
        status = self._latest(key, stored)
        if not status:
            return None
        try:
            return InferenceServiceStatus.model_validate(status)
        except ValidationError:
            return None  # a status this version does not understand is recomputed from scratch

    def write(self, write: StatusWriter, key: Key, status: dict[str, Any], stored: Mapping[str, Any] | None) -> bool:
        """Write ``status`` now if its meaning changed, later if only its details did, never if
        nothing did. Call with ``lock(key)`` held. True when it wrote now."""
        latest = self._latest(key, stored)
        if status == latest:
            return False
        if meaning(status) != meaning(self._written.get(key) or stored):
            with self._guard:
                self._pending.pop(key, None)
            self._write(write, key, status)
            return True
        with self._guard:
            first = key not in self._pending
            self._pending[key] = (status, write)
            if first:
                heapq.heappush(self._due, (self._clock() + self._defer_s, key))
                self._start_flusher()
                self._wake.notify()
        return False

    def _write(self, write: StatusWriter, key: Key, status: dict[str, Any]) -> None:
        write(key[0], key[1], status)
        self._written[key] = status
        self._on_write()

    def flush_due(self, now: float) -> None:
        """Write every deferred status whose time is up (the flusher thread calls this; tests too)."""
        while True:
            with self._guard:
                if not self._due or self._due[0][0] > now:
                    return
                _, key = heapq.heappop(self._due)
            with self.lock(key):
                with self._guard:
                    pending = self._pending.pop(key, None)
                if pending is None:
                    continue  # superseded by a write at once, or forgotten
                status, write = pending
                try:
                    self._write(write, key, status)
                except Exception as error:  # the API server hiccuped: try again shortly, unless superseded
                    log.warning("cannot write the status of %s/%s: %s; retrying", *key, error)
                    with self._guard:
                        self._pending.setdefault(key, pending)
                        heapq.heappush(self._due, (now + RETRY_S, key))

    def _start_flusher(self) -> None:
        if self._background and self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_forever, name="status-flusher", daemon=True)
            self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            with self._guard:
                while not self._due:
                    self._wake.wait()
                delay = self._due[0][0] - self._clock()
                if delay > 0:
                    self._wake.wait(delay)
            self.flush_due(self._clock())

    def forget(self, key: Key) -> None:
        with self._guard:
            self._locks.pop(key, None)
            self._pending.pop(key, None)
        self._written.pop(key, None)
        self.problems.pop(key, None)
