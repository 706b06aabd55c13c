"""The Argo CD health check (docs/gitops/argocd-health.lua), run through Lua on
statuses the operator's own ``compute_status`` writes.

Argo CD hands the object to the script as the global ``obj`` and reads back a
table with ``status`` and ``message``. lupa embeds a real Lua, so this is the
script as Argo CD runs it (Argo CD uses gopher-lua, Lua 5.1; the script uses
nothing newer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml
from forkless_operator import status as status_module
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService
from forkless_operator.status import APPLIED, compute_status, invalid_spec_status

REPO = Path(__file__).resolve().parents[2]
SCRIPT = (REPO / "docs" / "gitops" / "argocd-health.lua").read_text()
ARGOCD_CM = REPO / "docs" / "gitops" / "argocd-cm.yaml"
NOW = "2026-11-25T00:00:00Z"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return result["status"], result["message"]


@pytest.fixture(name="isvc_body")
def isvc_body_fixture() -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples" / "mlp-cpu.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="0f3c1c52-5a3b-4f6e-9a43-0c1d2b3a4e5f", generation=1)
    return body


def with_status(body: dict[str, Any], deployment: dict[str, Any] | None, pods: list[dict[str, Any]]) -> dict[str, Any]:
    isvc = InferenceService.model_validate({"metadata": body["metadata"], "spec": body["spec"]})
    generation = body["metadata"]["generation"]
    status = compute_status(isvc, deployment, pods, generation, reconciled=APPLIED, settings=Settings(), now=NOW)
    return {**body, "status": status}


def deployment(available: int, desired: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": 1,
            "replicas": desired,
            "updatedReplicas": desired,
            "readyReplicas": available,
            "availableReplicas": available,
        },
    }


def pending_pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "mlp-cpu-7d9f-abcde"}, "status": status}


def test_ready_is_healthy(isvc_body: dict[str, Any]) -> None:
    state, message = health(with_status(isvc_body, deployment(available=1), []))
    assert state == "Healthy"
    assert message.startswith("Available: ")


def test_no_status_yet_is_progressing(isvc_body: dict[str, Any]) -> None:
    assert health(isvc_body)[0] == "Progressing"
    assert health({**isvc_body, "status": {}})[0] == "Progressing"


def test_a_generation_the_operator_has_not_observed_is_progressing(isvc_body: dict[str, Any]) -> None:
    """Ready=True for generation 1 says nothing about generation 2, just applied by Argo CD."""
    obj = with_status(isvc_body, deployment(available=1), [])
    obj["metadata"]["generation"] = 2
    state, message = health(obj)
    assert state == "Progressing"
    assert "generation 2" in message


def test_a_rollout_in_progress_is_progressing(isvc_body: dict[str, Any]) -> None:
    state, message = health(with_status(isvc_body, deployment(available=0), []))
    assert state == "Progressing"
    assert message.startswith("Progressing: ")


def test_unschedulable_is_degraded(isvc_body: dict[str, Any]) -> None:
    pod = pending_pod(conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }])
    state, message = health(with_status(isvc_body, deployment(available=0), [pod]))
    assert state == "Degraded"
    assert message.startswith("Unschedulable: ") and "Insufficient nvidia.com/gpu" in message


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "CrashLoopBackOff"])
def test_a_container_that_cannot_start_is_degraded(isvc_body: dict[str, Any], reason: str) -> None:
    pod = pending_pod(containerStatuses=[{"name": "runtime", "state": {"waiting": {"reason": reason}}}])
    state, message = health(with_status(isvc_body, deployment(available=0), [pod]))
    assert (state, message.split(":")[0]) == ("Degraded", reason)


def test_invalid_spec_is_degraded(isvc_body: dict[str, Any]) -> None:
    status = invalid_spec_status("spec.runtime.workers: must be at least 1", generation=1, now=NOW)
    state, message = health({**isvc_body, "status": status})
    assert state == "Degraded"
    assert message == "InvalidSpec: spec.runtime.workers: must be at least 1"


def test_only_the_ready_condition_counts(isvc_body: dict[str, Any]) -> None:
    """A condition type added later (here, a failing one) does not change the verdict."""
    obj = with_status(isvc_body, deployment(available=1), [])
    obj["status"]["conditions"].append({"type": "SomethingNew", "status": "False", "reason": "CrashLoopBackOff"})
    assert health(obj)[0] == "Healthy"


def test_every_container_failure_the_operator_reports_is_degraded() -> None:
    degraded = set(re.findall(r"^\s*(\w+) = true,", SCRIPT, re.MULTILINE))
    assert set(status_module._WAITING_REASONS) <= degraded
    assert {"Unschedulable", "InvalidSpec", "ProgressDeadlineExceeded"} <= degraded
    # Transient reasons must stay Progressing, or every rollout flaps to Degraded.
    assert not {"Progressing", "DeploymentMissing", "Pending"} & degraded


def test_argocd_cm_snippet_carries_the_script_verbatim() -> None:
    config_map = yaml.safe_load(ARGOCD_CM.read_text())
    assert config_map["metadata"]["name"] == "argocd-cm"
    key = "resource.customizations.health.serving.forkless.dev_InferenceService"
    assert config_map["data"][key] == SCRIPT



def test_engine_ray_statuses_read_the_same_way() -> None:
    """The operator's Ready for engine ray (status_ray) needs no other check: Serving is Healthy, a Ray
    cluster on its way is Progressing, a Serve deploy that failed is Degraded."""
    body = yaml.safe_load((REPO / "examples" / "ray-cpu.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="0f3c1c52-5a3b-4f6e-9a43-0c1d2b3a4e5f", generation=1)
    isvc = InferenceService.model_validate({"metadata": body["metadata"], "spec": body["spec"]})

    def rayservice(app: str, ready: str = "True") -> dict[str, Any]:
        return {"metadata": {"generation": 1}, "status": {
            "observedGeneration": 1, "numServeEndpoints": 1,
            "conditions": [{"type": "Ready", "status": ready, "reason": "NonZeroServeEndpoints"}],
            "activeServiceStatus": {"applicationStatuses": {"mlp": {"status": app, "message": "ImportError: x"}}}}}

    def state(rs: dict[str, Any] | None) -> tuple[str, str]:
        status = compute_status(isvc, rs, [], 1, reconciled=APPLIED, settings=Settings(), now=NOW)
        return health({**body, "status": status})

    assert state(rayservice("RUNNING"))[0] == "Healthy"
    assert state(None)[0] == "Progressing" and state(rayservice("DEPLOYING"))[0] == "Progressing"
    failed = state(rayservice("DEPLOY_FAILED"))
    assert failed[0] == "Degraded" and failed[1].startswith("ServeDeployFailed: ") and "ImportError" in failed[1]
