"""The work that watch events ask for, done in a few threads, queued at most once per InferenceService.

A pod or child event only says "look at this InferenceService again": apply a drifted child again,
or recompute the status. The handlers that receive those events are async and return at once, so
kopf's per-object worker drops the event's parsed body. Run in kopf's handler threads instead,
every event waited for a thread behind the reconciles while kopf held its body in that object's
queue: in a burst of 1000 creations that was most of the operator's peak memory (docs/operator.md,
Scale). The work reads the indexes when it runs, so the events that arrive while an
InferenceService waits cost one refresh, not one each; and one InferenceService's work never runs
in two threads at once, so a request made while it runs is done once more after it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger("forkless.followups")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FollowUps(Generic[K, V]):
    """``work(key, asked)`` for each key requested, ``asked`` merged over the requests that waited."""

    def __init__(self, work: Callable[[K, V], None], merge: Callable[[V, V], V]) -> None:
        self._work = work
        self._merge = merge
        self._changed = threading.Condition()
        self._queue: deque[K] = deque()  # keys with a request and no work running, oldest first
        self._asked: dict[K, V] = {}  # what each waiting key was asked for, merged
        self._running: set[K] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def request(self, key: K, asked: V) -> None:
        """Ask for work on ``key``; merged into a request that still waits. Never blocks on the work."""
        with self._changed:
            if key in self._asked:
                self._asked[key] = self._merge(self._asked[key], asked)
                return
            self._asked[key] = asked
            if key not in self._running:  # else _finish queues it once the running work is done
                self._queue.append(key)
                self._changed.notify()

    def waiting(self) -> int:
        with self._changed:
            return len(self._asked)

    def run_waiting(self) -> int:
        """Do the waiting work in this thread until none is left; how many ran (for tests)."""
        done = 0
        while self._run_one(block=False):
            done += 1
        return done

    def start(self, threads: int) -> None:
        with self._changed:
            self._stopping = False
        for number in range(threads):
            thread = threading.Thread(target=self._serve, name=f"followups-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Let the threads finish the work they run; what still waits is dropped (a restart reconciles all)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _serve(self) -> None:
        while self._run_one(block=True):
            pass

    def _run_one(self, block: bool) -> bool:
        with self._changed:
            while not self._queue:
                if self._stopping or not block:
                    return False
                self._changed.wait()
            key = self._queue.popleft()
            asked = self._asked.pop(key)
            self._running.add(key)
        try:
            self._work(key, asked)
        except Exception:  # the thread must survive whatever one InferenceService's work raises
            log.exception("follow-up work for %s failed", key)
        finally:
            self._finish(key)
        return True

    def _finish(self, key: K) -> None:
        with self._changed:
            self._running.discard(key)
            if key in self._asked:
                self._queue.append(key)
                self._changed.notify()
