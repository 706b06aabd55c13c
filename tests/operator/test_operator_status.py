"""compute_status, by value, on Deployments and pods as the API server returns them."""

from __future__ import annotations

from typing import Any

import pytest
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService, InferenceServiceStatus
from forkless_operator.status import APPLIED, Observation, compute_status, invalid_spec_status

SETTINGS = Settings()
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
SCHEDULER_MESSAGE = "0/3 nodes are available: 1 node(s) had untolerated taint {x: y}, 2 Insufficient nvidia.com/gpu."


def isvc(**spec: Any) -> InferenceService:
    return InferenceService.model_validate({
        "metadata": {"name": "cnn", "namespace": "ml", "generation": 3},
        "spec": {"model": {"uri": "pvc://models/cnn.pt2"}, "resources": {"gpus": 2}, "runtime": {"workers": 4}, **spec},
    })


def deployment(desired: int = 2, updated: int = 2, available: int = 2, ready: int = 2, replicas: int = 2,
               generation: int = 5, observed: int = 5) -> dict[str, Any]:
    return {
        "metadata": {"name": "cnn", "generation": generation},
        "spec": {"replicas": desired},
        "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                   "availableReplicas": available, "readyReplicas": ready},
    }


def pending_pod(name: str = "cnn-abc") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHEDULER_MESSAGE}]}}


def waiting_pod(reason: str, message: str, name: str = "cnn-def") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "runtime", "ready": False, "state": {"waiting": {"reason": reason, "message": message}}}]}}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_when_updated_replicas_are_available() -> None:
    status = compute_status(isvc(), deployment(), [], 3, reconciled=APPLIED, settings=SETTINGS, now=T0)
    assert status == {
        "observedGeneration": 3,
        "url": "http://cnn.ml.svc.cluster.local",
        "address": {"url": "http://cnn-predictor.ml.svc.cluster.local"},
        "replicas": 2,
        "readyReplicas": 2,
        "replicaSummary": "2/2",
        "selector": "app.kubernetes.io/name=forkless-runtime,app.kubernetes.io/instance=cnn",
        "gpus": 4,
        "workers": 4,
        "modelStatus": {"transitionStatus": "UpToDate",
                        "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                        "copies": {"failedCopies": 0, "totalCopies": 0}},
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Available", "message": "2/2 replicas are available",
             "lastTransitionTime": T0, "observedGeneration": 3},
            {"type": "Reconciled", "status": "True", "reason": "Applied",
             "message": "all children are applied for this generation", "lastTransitionTime": T0,
             "observedGeneration": 3},
        ],
    }


def test_unschedulable_carries_the_scheduler_message() -> None:
    status = compute_status(isvc(), deployment(available=0, ready=0), [pending_pod()], 3, reconciled=APPLIED, now=T0)
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    assert ready["message"] == f"pod cnn-abc cannot be scheduled: {SCHEDULER_MESSAGE}"


def test_image_pull_and_crash_loop_are_surfaced() -> None:
    pull = waiting_pod("ImagePullBackOff", 'Back-off pulling image "nope:1"')
    ready = conditions(compute_status(isvc(), deployment(available=0), [pull], 3, reconciled=APPLIED, now=T0))["Ready"]
    assert (ready["reason"], ready["message"]) == (
        "ImagePullBackOff", 'container runtime of pod cnn-def cannot start: Back-off pulling image "nope:1"')
    crash = waiting_pod("CrashLoopBackOff", "back-off 10s restarting failed container")
    ready = conditions(compute_status(isvc(), deployment(available=1), [crash], 3, reconciled=APPLIED, now=T0))["Ready"]
    assert ready["reason"] == "CrashLoopBackOff"


def test_unschedulable_wins_over_crash_loop_whatever_the_pod_order() -> None:
    pods = [waiting_pod("CrashLoopBackOff", "x", name="a"), pending_pod(name="b")]
    for order in (pods, pods[::-1]):
        ready = conditions(compute_status(isvc(), deployment(available=0), order, 3, reconciled=APPLIED))["Ready"]
        assert ready["reason"] == "Unschedulable"


def test_progressing_otherwise() -> None:
    ready = conditions(compute_status(isvc(), deployment(updated=1, available=1), [], 3, reconciled=APPLIED))["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Progressing")
    stale = deployment(generation=6, observed=5)
    ready = conditions(compute_status(isvc(), stale, [], 3, reconciled=APPLIED))["Ready"]
    assert ready["reason"] == "Progressing"
    assert "not observed the latest spec" in ready["message"]
    ready = conditions(compute_status(isvc(), None, [], 3, reconciled=APPLIED))["Ready"]
    assert ready["reason"] == "DeploymentMissing"


def test_old_pods_still_running_mean_not_ready() -> None:
    rolling = deployment(updated=2, available=3, replicas=3)
    assert conditions(compute_status(isvc(), rolling, [], 3, reconciled=APPLIED))["Ready"]["status"] == "False"


def test_last_transition_time_is_kept_while_status_is_unchanged() -> None:
    first = compute_status(isvc(), deployment(available=0), [], 3, reconciled=APPLIED, now=T0)
    previous = InferenceServiceStatus.model_validate(first)
    second = compute_status(isvc(), deployment(available=1), [], 3, reconciled=APPLIED, previous=previous, now=T1)
    assert conditions(second)["Ready"]["lastTransitionTime"] == T0
    assert conditions(second)["Reconciled"]["lastTransitionTime"] == T0
    third = compute_status(isvc(), deployment(), [], 3, reconciled=APPLIED,
                           previous=InferenceServiceStatus.model_validate(second), now=T1)
    assert conditions(third)["Ready"]["lastTransitionTime"] == T1
    assert compute_status(isvc(), deployment(), [], 3, reconciled=APPLIED,
                          previous=InferenceServiceStatus.model_validate(third), now="2030-01-01T00:00:00Z") == third


def test_pod_events_keep_the_reconciled_generation() -> None:
    applied = compute_status(isvc(), deployment(available=0), [], 3, reconciled=APPLIED, now=T0)
    later = compute_status(isvc(), deployment(), [], 4, previous=InferenceServiceStatus.model_validate(applied), now=T1)
    assert later["observedGeneration"] == 3
    assert conditions(later)["Reconciled"] == conditions(applied)["Reconciled"]
    assert conditions(later)["Ready"]["status"] == "True"


def test_problem_and_failed_reconcile_make_ready_false() -> None:
    missing = Observation(False, "ModelClaimNotFound", 'persistentvolumeclaim "models" must exist')
    ready = conditions(compute_status(isvc(), deployment(), [], 3, reconciled=APPLIED, problem=missing))["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ModelClaimNotFound")
    failed = Observation(False, "ApplyFailed", "the Deployment cannot be applied: x")
    both = conditions(compute_status(isvc(), deployment(), [], 3, reconciled=failed))
    assert both["Ready"]["reason"] == both["Reconciled"]["reason"] == "ApplyFailed"


def test_autoscaled_counts_gpus_of_the_deployment_replicas() -> None:
    service = isvc(autoscaling={"maxReplicas": 5}, resources={"gpus": 1, "cpu": "2"})
    status = compute_status(service, deployment(desired=3, available=3, ready=3, updated=3, replicas=3), [], 3,
                            reconciled=APPLIED)
    assert (status["gpus"], status["replicaSummary"], status["replicas"]) == (3, "3/3", 3)


def test_invalid_spec_status() -> None:
    status = invalid_spec_status("startMethod must be spawn or forkserver", 7, now=T0)
    assert status["observedGeneration"] == 7
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Ready": ("False", "InvalidSpec"), "Reconciled": ("False", "InvalidSpec")}


# --- a model that cannot download or load ----------------------------------------------------------


def crashed_pod(container: str, message: str, exit_code: int = 1, init: bool = False, name: str = "cnn-ghi",
                reason: str = "Error") -> dict[str, Any]:
    """A pod whose container gave up and waits in CrashLoopBackOff, its last words in lastState."""
    crashed = {"name": container, "ready": False,
               "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}},
               "lastState": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                                            "finishedAt": T0}}}
    key = "initContainerStatuses" if init else "containerStatuses"
    return {"metadata": {"name": name}, "status": {"phase": "Pending", key: [crashed]}}


@pytest.mark.parametrize(
    ("pod", "reason", "message"),
    [
        (crashed_pod("download-model", "ModelDownloadFailed: s3://models/cnn: access denied (403), check the credentials",
                     init=True),
         "ModelDownloadFailed", "s3://models/cnn: access denied (403), check the credentials"),
        (crashed_pod("runtime", "ModelLoadFailed: the model cannot be loaded: RuntimeError: PytorchStreamReader failed\n"
                     "more detail"),
         "ModelLoadFailed", "the model cannot be loaded: RuntimeError: PytorchStreamReader failed"),
        (crashed_pod("runtime", "ModelOutOfMemory: CUDA out of memory"), "ModelOutOfMemory", "CUDA out of memory"),
        (crashed_pod("runtime", "", exit_code=137, reason="OOMKilled"), "ModelOutOfMemory",
         "the container exceeded its memory limit and was killed (OOMKilled)"),
        (crashed_pod("download-model", "Traceback (most recent call last):", init=True), "ModelDownloadFailed",
         "Traceback (most recent call last):"),
    ],
)
def test_a_model_that_cannot_download_or_load_says_why(pod: dict[str, Any], reason: str, message: str) -> None:
    status = compute_status(isvc(), deployment(available=0, ready=0), [pending_pod("cnn-a"), pod], 3,
                            reconciled=APPLIED, settings=SETTINGS, now=T0)
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert ready["message"].startswith(message)
    assert "pod cnn-ghi container" in ready["message"]
    model = status["modelStatus"]
    assert model["transitionStatus"] == "BlockedByFailedLoad"
    assert model["states"] == {"activeModelState": "FailedToLoad", "targetModelState": "FailedToLoad"}
    assert model["copies"] == {"failedCopies": 1, "totalCopies": 2}
    assert model["lastFailureInfo"]["reason"] == reason
    assert model["lastFailureInfo"]["time"] == T0


def test_a_crash_unrelated_to_the_model_stays_a_crash_loop() -> None:
    pod = crashed_pod("runtime", "usage: forkless-runtime ...", exit_code=2)
    status = compute_status(isvc(), deployment(available=0, ready=0), [pod], 3, reconciled=APPLIED,
                            settings=SETTINGS, now=T0)
    assert conditions(status)["Ready"]["reason"] == "CrashLoopBackOff"
    assert status["modelStatus"]["copies"]["failedCopies"] == 0


def test_a_retry_keeps_the_reason_and_a_recovered_container_keeps_only_the_last_failure() -> None:
    failed = compute_status(isvc(), deployment(available=0, ready=0),
                            [crashed_pod("runtime", "ModelLoadFailed: bad file")], 3,
                            reconciled=APPLIED, settings=SETTINGS, now=T0)
    retrying = crashed_pod("runtime", "ModelLoadFailed: bad file")
    retrying["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": T0}}
    previous = InferenceServiceStatus.model_validate(failed)
    status = compute_status(isvc(), deployment(available=0, ready=0), [retrying], 3, reconciled=APPLIED,
                            previous=previous, settings=SETTINGS, now=T0)
    assert conditions(status)["Ready"]["reason"] == "ModelLoadFailed"  # the kubelet's retry: no flip and back
    recovered = crashed_pod("runtime", "ModelLoadFailed: bad file")
    recovered["status"]["containerStatuses"][0].update(state={"running": {"startedAt": T0}}, ready=True)
    status = compute_status(isvc(), deployment(available=0, ready=0), [recovered], 3, reconciled=APPLIED,
                            previous=previous, settings=SETTINGS, now=T0)
    assert conditions(status)["Ready"]["reason"] == "Progressing"
    assert status["modelStatus"]["states"]["targetModelState"] == "Loading"
    assert status["modelStatus"]["transitionStatus"] == "InProgress"
    assert status["modelStatus"]["lastFailureInfo"]["message"] == "bad file"


def test_a_warning_is_due_once_per_new_problem_and_never_on_the_way_to_ready() -> None:
    from forkless_operator.status import new_problem

    progressing = compute_status(isvc(), deployment(available=0, ready=0), [], 3, reconciled=APPLIED,
                                 settings=SETTINGS, now=T0)
    assert new_problem(None, progressing) is None
    failing = compute_status(isvc(), deployment(available=0, ready=0),
                             [crashed_pod("download-model", "ModelDownloadFailed: 403", init=True)], 3,
                             reconciled=APPLIED, settings=SETTINGS, now=T0)
    problem = new_problem(InferenceServiceStatus.model_validate(progressing), failing)
    assert problem is not None and problem.reason == "ModelDownloadFailed"
    assert new_problem(InferenceServiceStatus.model_validate(failing), failing) is None  # the kubelet's retry
    ready = compute_status(isvc(), deployment(), [], 3, reconciled=APPLIED, settings=SETTINGS, now=T0)
    assert new_problem(InferenceServiceStatus.model_validate(failing), ready) is None
