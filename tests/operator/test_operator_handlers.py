"""The logic the kopf handlers call, without kopf: which Deployment view status is judged by, drift
detection, the status cache, and the one table of kinds (the cluster tests run them for real)."""

from __future__ import annotations

from typing import Any

import pytest
from forkless_operator import kinds
from forkless_operator.apply import PLURALS
from forkless_operator.drift import AppliedChildren, applied_state, drifted
from forkless_operator.reconcile import freshest_deployment, parse, validation_message
from forkless_operator.render import render_children
from forkless_operator.spec import InferenceService
from forkless_operator.status_cache import StatusCache
from pydantic import ValidationError


def deployment(generation: int, available: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": {"availableReplicas": available}}


def test_the_watch_view_wins_when_it_has_the_applied_generation() -> None:
    # The pod became ready between the apply and the first status write: the index knows, the apply answer not.
    applied, indexed = deployment(1, 0), deployment(1, 1)
    assert freshest_deployment(applied, indexed) is indexed


def test_the_apply_answer_wins_over_a_watch_view_of_an_older_generation() -> None:
    applied, indexed = deployment(2, 0), deployment(1, 1)
    assert freshest_deployment(applied, indexed) is applied


def test_whichever_exists() -> None:
    only = deployment(1, 0)
    assert freshest_deployment(only, None) is only
    assert freshest_deployment(None, only) is only
    assert freshest_deployment(None, None) is None


# --- drift -------------------------------------------------------------------------------------

MANIFEST = {"metadata": {"labels": {"app.kubernetes.io/name": "forkless-runtime"}, "annotations": {"a": "1"}}}


def child(generation: int | None, resource_version: str = "1", labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": resource_version,
                            "labels": MANIFEST["metadata"]["labels"] if labels is None else labels,
                            "annotations": MANIFEST["metadata"]["annotations"] if annotations is None else annotations}
    if generation is not None:
        meta["generation"] = generation
    return {"metadata": meta}


def test_our_own_echoes_are_not_drift() -> None:
    known = applied_state(MANIFEST, child(3))
    assert not drifted(known, child(3, resource_version="9"))  # the controller updated status
    assert not drifted(known, child(2))  # a late event from before our apply
    extra = {**MANIFEST["metadata"]["labels"], "someone/else": "x"}
    assert not drifted(known, child(3, labels=extra))  # labels of other tools are theirs


def test_edits_by_others_are_drift() -> None:
    known = applied_state(MANIFEST, child(3))
    assert drifted(known, child(4))  # spec changed past ours
    assert drifted(known, child(3, labels={}))  # our label removed
    assert drifted(known, child(3, annotations={"a": "2"}))  # our annotation changed
    service = applied_state(MANIFEST, child(None, resource_version="5"))  # no generation: resourceVersion
    assert not drifted(service, child(None, resource_version="5"))
    assert drifted(service, child(None, resource_version="6"))


def test_only_children_the_operator_applied_are_repaired() -> None:
    record = AppliedChildren()
    key = ("ns", "m")
    assert not record.needs_repair("Deployment", key, "DELETED", child(1))  # never applied here
    record.remember("Deployment", key, MANIFEST, child(1))
    assert record.needs_repair("Deployment", key, "DELETED", child(1))
    assert not record.needs_repair("Deployment", key, "MODIFIED", child(1))
    record.forget(key)
    assert not record.needs_repair("Deployment", key, "DELETED", child(1))


# --- the status cache ------------------------------------------------------------------------------


def status(generation: int = 1, ready: str = "False", reason: str = "Progressing", summary: str = "0/1") -> dict[str, Any]:
    return {"observedGeneration": generation, "replicaSummary": summary,
            "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": summary,
                            "lastTransitionTime": "2026-11-25T00:00:00Z"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_identical_status_is_not_written_again() -> None:
    written: list[tuple[str, str, dict[str, Any]]] = []
    counted: list[int] = []
    cache = StatusCache(on_write=lambda: counted.append(1), background=False)
    first = status()
    assert cache.write(lambda *args: written.append(args), ("ns", "m"), first, stored=None)
    assert not cache.write(lambda *args: written.append(args), ("ns", "m"), dict(first), stored=None)
    assert not cache.write(lambda *args: written.append(args), ("ns", "x"), dict(first), stored=first)
    assert written == [("ns", "m", first)] and counted == [1]
    assert cache.previous(("ns", "m"), None).observed_generation == 1  # type: ignore[union-attr]
    cache.forget(("ns", "m"))
    assert cache.previous(("ns", "m"), None) is None


def test_a_change_of_meaning_is_written_at_once_and_carries_the_latest_details() -> None:
    clock, written = Clock(), []
    cache = StatusCache(clock=clock, background=False)
    key = ("ns", "m")
    cache.write(lambda *args: written.append(args[2]), key, status(summary="0/1"), stored=None)
    # Counts moved: deferred, and what the next computation builds on.
    assert not cache.write(lambda *args: written.append(args[2]), key, status(summary="1/1"), stored=None)
    assert cache.previous(key, None).replica_summary == "1/1"  # type: ignore[union-attr]
    assert len(written) == 1
    # Ready: written now, and nothing is left to flush.
    ready = status(ready="True", reason="Available", summary="1/1")
    assert cache.write(lambda *args: written.append(args[2]), key, ready, stored=None)
    clock.now += 60
    cache.flush_due(clock.now)
    assert written == [status(summary="0/1"), ready]


def test_a_step_on_the_ordinary_way_to_ready_is_a_detail_and_a_problem_is_news() -> None:
    clock, written = Clock(), []
    cache = StatusCache(clock=clock, background=False, defer_s=5)
    key = ("ns", "m")
    cache.write(lambda *args: written.append(args[2]), key, status(reason="Progressing"), stored=None)
    assert not cache.write(lambda *args: written.append(args[2]), key, status(reason="Pending"), stored=None)
    assert cache.write(lambda *args: written.append(args[2]), key, status(reason="ImagePullBackOff"), stored=None)
    assert cache.write(lambda *args: written.append(args[2]), key, status(ready="True", reason="Available"), stored=None)
    clock.now += 60
    cache.flush_due(clock.now)
    assert [w["conditions"][0]["reason"] for w in written] == ["Progressing", "ImagePullBackOff", "Available"]


def test_details_alone_are_written_once_when_their_time_is_up() -> None:
    clock, written = Clock(), []
    cache = StatusCache(clock=clock, background=False, defer_s=5)
    key = ("ns", "m")
    cache.write(lambda *args: written.append(args[2]), key, status(summary="0/3"), stored=None)
    for summary in ("1/3", "2/3"):
        cache.write(lambda *args: written.append(args[2]), key, status(summary=summary), stored=None)
    clock.now += 4.9
    cache.flush_due(clock.now)
    assert len(written) == 1
    clock.now += 0.2
    cache.flush_due(clock.now)
    assert written == [status(summary="0/3"), status(summary="2/3")]


def test_a_failed_deferred_write_is_retried() -> None:
    clock, attempts = Clock(), []

    def flaky(namespace: str, name: str, body: dict[str, Any]) -> None:
        attempts.append(body)
        if len(attempts) == 2:
            raise ConnectionError("API server restarting")

    cache = StatusCache(clock=clock, background=False, defer_s=5)
    key = ("ns", "m")
    cache.write(flaky, key, status(summary="0/1"), stored=None)
    cache.write(flaky, key, status(summary="1/1"), stored=None)
    clock.now += 6
    cache.flush_due(clock.now)
    clock.now += 3
    cache.flush_due(clock.now)
    assert [a["replicaSummary"] for a in attempts] == ["0/1", "1/1", "1/1"]


def test_a_status_this_version_cannot_read_is_recomputed() -> None:
    assert StatusCache(background=False).previous(("ns", "m"), {"conditions": "not a list"}) is None


# --- parsing and the kinds table ------------------------------------------------------------------


def test_an_invalid_spec_gives_a_message_naming_the_field() -> None:
    with pytest.raises(ValidationError) as error:
        parse({"metadata": {"name": "m"}, "spec": {"model": {"uri": "file:///m.pt"}, "runtime": {"workers": 0}}})
    assert validation_message(error.value).startswith("spec.runtime.workers: workers must be at least 1")


def test_every_rendered_child_kind_is_in_the_one_table_and_has_a_path() -> None:
    rendered: dict[str, Any] = {}
    for engine, autoscaling in (("deployment", {"maxReplicas": 3}),
                                ("deployment", {"maxReplicas": 3, "class": "keda", "metric": "queueDepth"}),
                                ("ray", {"maxReplicas": 3, "metric": "inFlight"})):
        body = {"metadata": {"name": "m", "namespace": "ns", "uid": "u"},
                "spec": {"model": {"uri": "file:///m.pt"}, "autoscaling": autoscaling, "resources": {"cpu": 1},
                         "engine": engine}}
        children = render_children(InferenceService.model_validate(body))
        assert list(children) == [child.role for child in kinds.CHILDREN]
        rendered.update({role: manifest for role, manifest in children.items() if manifest is not None})
    for child in kinds.CHILDREN:
        manifest = rendered.get(child.role)
        assert manifest is not None
        assert (manifest["apiVersion"], manifest["kind"]) in PLURALS
        assert manifest["kind"] == child.kind.kind and manifest["metadata"]["name"] == child.name("m")
        assert kinds.child_of(child.kind.kind, child.name("m"), "m") == child
