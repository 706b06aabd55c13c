"""The follow-up queue that child and pod events feed: one piece of work per InferenceService however
many events asked, never two at once for one InferenceService, and a failure that stops nothing.
Deterministic: the work runs in the test's thread (run_waiting) except where threads are the point."""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf
from forkless_operator import handlers
from forkless_operator.followups import FollowUps
from forkless_operator.handlers import Asked, Indexes


def test_requests_that_wait_together_are_done_once_with_what_each_asked() -> None:
    calls: list[tuple[str, frozenset[str]]] = []
    followups: FollowUps[str, frozenset[str]] = FollowUps(lambda key, asked: calls.append((key, asked)),
                                                          frozenset.union)
    for asked in ("refresh", "repair", "refresh"):
        followups.request("ns/a", frozenset({asked}))
    followups.request("ns/b", frozenset({"refresh"}))
    assert followups.waiting() == 2
    assert followups.run_waiting() == 2
    assert calls == [("ns/a", frozenset({"refresh", "repair"})), ("ns/b", frozenset({"refresh"}))]
    assert followups.run_waiting() == 0


def test_a_request_made_during_the_work_runs_after_it_never_beside_it() -> None:
    calls: list[tuple[str, int]] = []

    def work(key: str, asked: int) -> None:
        calls.append((key, asked))
        if len(calls) == 1:
            followups.request("a", 2)  # news about the InferenceService being worked on
            followups.request("b", 1)
            # Another InferenceService's work may run meanwhile; "a" again may not while "a" runs.
            assert followups.run_waiting() == 1

    followups: FollowUps[str, int] = FollowUps(work, max)
    followups.request("a", 1)
    assert followups.run_waiting() == 2
    assert calls == [("a", 1), ("b", 1), ("a", 2)]


def test_a_failing_piece_of_work_is_logged_and_the_threads_go_on(caplog: Any) -> None:
    done = threading.Event()

    def work(key: str, _asked: bool) -> None:
        if key == "broken":
            raise RuntimeError("the API server said no")
        done.set()

    followups: FollowUps[str, bool] = FollowUps(work, lambda a, b: a or b)
    followups.start(threads=1)
    try:
        with caplog.at_level(logging.ERROR, logger="forkless.followups"):
            followups.request("broken", True)
            followups.request("fine", True)
            assert done.wait(timeout=10), "the thread died with the first failure"
        assert "follow-up work for broken failed" in caplog.text
    finally:
        followups.stop()


# --- what the event handlers ask for ------------------------------------------------------------

KEY = ("ns", "isvc")


def child_body(kind: str, name: str, generation: int) -> kopf.Body:
    return kopf.Body({
        "kind": kind, "metadata": {
            "name": name, "namespace": "ns", "generation": generation, "resourceVersion": str(generation),
            "ownerReferences": [{"apiVersion": handlers.API_VERSION, "kind": "InferenceService", "name": "isvc",
                                 "controller": True}],
        },
    })


def test_child_events_ask_for_a_refresh_or_a_repair_and_events_of_unknown_owners_for_nothing(
        monkeypatch: Any) -> None:
    requested: list[tuple[tuple[str, str], Asked]] = []
    monkeypatch.setattr(handlers.FOLLOW_UPS, "request", lambda key, asked: requested.append((key, asked)))
    applied = handlers.AppliedChildren()
    monkeypatch.setattr(handlers, "APPLIED_CHILDREN", applied)
    isvc = {"metadata": {"name": "isvc", "namespace": "ns"}, "spec": {}, "status": {}}
    kwargs: dict[str, Any] = {"isvc_index": {KEY: [isvc]}, "deployment_index": {}, "pod_index": {},
                              "logger": logging.getLogger("test")}
    deployment, service = child_body("Deployment", "isvc", 1), child_body("Service", "isvc", 1)
    applied.remember("Deployment", KEY, {"metadata": {}}, deployment)
    applied.remember("Service", KEY, {"metadata": {}}, service)

    handlers.on_child_event("Deployment", "MODIFIED", deployment, "ns", kwargs)  # the controller's status update
    handlers.on_child_event("Service", "MODIFIED", service, "ns", kwargs)  # the echo of our own apply
    assert [(key, asked.repair, asked.refresh) for key, asked in requested] == [(KEY, False, True)]

    requested.clear()
    handlers.on_child_event("Deployment", "MODIFIED", child_body("Deployment", "isvc", 2), "ns", kwargs)  # kubectl edit
    handlers.on_child_event("Service", "DELETED", service, "ns", kwargs)
    assert [(key, asked.repair, asked.refresh) for key, asked in requested] == [(KEY, True, True), (KEY, True, False)]

    requested.clear()
    gone = {**kwargs, "isvc_index": {}}  # the owner was deleted: the garbage collector handles its children
    handlers.on_child_event("Service", "DELETED", service, "ns", gone)
    assert requested == []


def test_waiting_asks_merge_into_one_repair_and_refresh() -> None:
    indexes = Indexes(isvc={}, deployment={}, pod={})  # type: ignore[arg-type]
    merged = Asked(repair=True, refresh=False, indexes=indexes).merged(Asked(False, True, indexes))
    assert (merged.repair, merged.refresh) == (True, True)
