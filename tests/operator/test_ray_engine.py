"""engine: ray: the rendered RayService and its serveConfigV2, and the status read from a RayService."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from forkless_operator import spec
from forkless_operator.ray_services import RayServices
from forkless_operator.reconcile import parse
from forkless_operator.render import render_children
from forkless_operator.render_ray import APP_IMPORT_PATH, render_ray_service, serve_config
from forkless_operator.settings import Settings
from forkless_operator.status import APPLIED, compute_status
from forkless_operator.status_ray import ray_view
from forkless_runtime.engines.ray import parse_settings
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
RAY_ENV = ROOT / ".venv-ray"
SETTINGS = Settings(ray_image="localhost/forkless-ray:test")


def isvc(name: str = "mlp", **spec_fields: Any) -> Any:
    body = {"model": {"uri": "file:///models/mlp.pt"}, "engine": "ray", **spec_fields}
    return parse({"metadata": {"name": name, "namespace": "ns", "uid": "u-1", "generation": 3}, "spec": body})


def example(name: str) -> Any:
    return parse(yaml.safe_load((ROOT / "examples" / name).read_text()))


def worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def app_of(rayservice: dict[str, Any]) -> dict[str, Any]:
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app


# --- rendering ------------------------------------------------------------------------------------


def test_engine_ray_renders_one_rayservice_and_no_deployment_children() -> None:
    children = render_children(isvc(), SETTINGS)
    assert [role for role, manifest in children.items() if manifest is not None] == ["RayService"]
    assert render_ray_service(parse({"metadata": {"name": "d"}, "spec": {"model": {"uri": "file:///m.pt"}}})) is None
    rayservice = children["RayService"]
    assert rayservice["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    assert rayservice["metadata"]["annotations"] == {"ray.io/initializing-timeout": "900s"}


def test_gpu_workers_carry_the_limit_toleration_shm_model_volume_and_download() -> None:
    service = isvc("cnn", model={"uri": "s3://models/cnn/cnn.pt"}, resources={"gpus": 4, "memory": "16Gi"},
                   runtime={"workers": 8}, ray={"gpusPerWorkerPod": 2})
    group = worker_group(render_ray_service(service, SETTINGS))
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # 4 GPUs in pods of 2
    assert group["rayStartParams"]["num-gpus"] == "2"
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/mnt/models"}
    (download,) = pod["initContainers"]
    assert download["command"][:4] == ["forkless-runtime", "fetch", "s3://models/cnn/cnn.pt", "/mnt/models"]
    head = render_ray_service(service, SETTINGS)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(head)
    deployment = app_of(render_ray_service(service, SETTINGS))["deployments"][0]
    assert deployment["num_replicas"] == 8
    assert deployment["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.5}


def test_serve_config_carries_the_runtime_settings_that_the_runtime_parses() -> None:
    service = example("ray-cpu.yaml")
    app = app_of(render_ray_service(service, SETTINGS))
    assert app["import_path"] == APP_IMPORT_PATH and app["route_prefix"] == "/" and app["name"] == "mlp"
    settings = parse_settings(app["args"]["settings"])  # the runtime's own parser, as a replica reads them
    assert (settings.model_name, settings.model_uri, settings.format) == ("mlp", "file:///models/mlp.pt", "torchscript")
    assert (settings.max_batch_size, settings.max_batch_delay_ms, settings.threads_per_worker) == (16, 2.0, 1)
    assert json.loads(settings.signature or "{}")["inputs"][0]["name"] == "x"
    (deployment,) = app["deployments"]
    assert deployment["num_replicas"] == 2 and deployment["max_ongoing_requests"] == 64


def test_a_fractional_gpu_becomes_the_replicas_own_memory_cap() -> None:
    app = app_of(render_ray_service(example("ray-gpu.yaml"), SETTINGS))
    settings = parse_settings(app["args"]["settings"])
    assert settings.gpu_memory_fraction == 0.5 and settings.device == "cuda"
    whole = app_of(render_ray_service(isvc(resources={"gpus": 1}), SETTINGS))
    assert parse_settings(whole["args"]["settings"]).gpu_memory_fraction is None


def test_autoscaling_is_serves_on_requests_in_flight_and_rays_for_pods() -> None:
    rayservice = render_ray_service(example("ray-gpu.yaml"), SETTINGS)
    config = app_of(rayservice)["deployments"][0]["autoscaling_config"]
    assert config == {"min_replicas": 4, "max_replicas": 12, "target_ongoing_requests": 16.0}  # 4 workers each
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    group = worker_group(rayservice)
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 6)


def test_haproxy_ingress_sets_serves_variables_on_head_and_workers() -> None:
    rayservice = render_ray_service(isvc(ray={"ingress": "haproxy"}), SETTINGS)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = worker_group(rayservice)["template"]["spec"]["containers"][0]
    for container in (head, worker):
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container["env"]


@pytest.mark.skipif(not RAY_ENV.exists(), reason="make ray-env installs Ray Serve beside the venv")
def test_rendered_serve_config_validates_against_rays_own_schema() -> None:
    configs = [render_ray_service(s, SETTINGS)["spec"]["serveConfigV2"]
               for s in (example("ray-cpu.yaml"), example("ray-gpu.yaml"), isvc(ray={"ingress": "haproxy"}))]
    check = ("import sys, yaml\nfrom ray.serve.schema import ServeDeploySchema\n"
             "for doc in sys.stdin.read().split('\\n---\\n'):\n"
             "    ServeDeploySchema.model_validate(yaml.safe_load(doc))\nprint('valid')\n")
    result = subprocess.run([sys.executable, "-c", check], input="\n---\n".join(configs), capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(RAY_ENV)}, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "valid", result.stderr
    wrong = yaml.safe_load(configs[0])
    wrong["applications"][0]["deployments"][0]["num_replicas"] = "two"
    result = subprocess.run([sys.executable, "-c", check], input=yaml.safe_dump(wrong), capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(RAY_ENV)}, timeout=120)
    assert result.returncode != 0 and "num_replicas" in result.stderr  # the check can fail


def test_serve_config_is_yaml_of_typed_fields_only() -> None:
    config = serve_config(isvc(runtime={"requestTimeoutSeconds": 20, "maxQueue": 100}), SETTINGS)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 20.0}
    assert config["applications"][0]["deployments"][0]["max_queued_requests"] == 100


# --- rules ------------------------------------------------------------------------------------------


def test_a_long_name_is_refused_for_engine_ray_only() -> None:
    long_name = "m" * 48
    with pytest.raises(ValidationError, match="at most 47 characters"):
        isvc(long_name)
    parse({"metadata": {"name": long_name}, "spec": {"model": {"uri": "file:///m.pt"}}})
    assert spec.RAY_NAME_RULE.rule in json.dumps(__import__("forkless_operator.crd", fromlist=["x"]).openapi_schema())


# --- status ----------------------------------------------------------------------------------------


def rayservice(generation: int = 3, observed: int | None = 3, ready: tuple[str, str] = ("True", "NonZeroServeEndpoints"),
               app: str = "RUNNING", message: str = "", deployment: str = "HEALTHY", upgrading: bool = False,
               pending_app: str | None = None) -> dict[str, Any]:
    active: dict[str, Any] = {
        "rayClusterName": "mlp-abcde",
        "applicationStatuses": {"mlp": {"status": app, "message": message, "serveDeploymentStatuses": {
            "ForklessModel": {"status": deployment, "message": "replica died" if deployment == "UNHEALTHY" else ""}}}},
        "rayClusterStatus": {"desiredWorkerReplicas": 2, "readyWorkerReplicas": 1, "desiredGPU": "2"},
    }
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": ready[0], "reason": ready[1], "message": ""},
                       {"type": "UpgradeInProgress", "status": "True" if upgrading else "False",
                        "reason": "BothActivePendingClustersExist" if upgrading else "NoPendingCluster"}],
        "activeServiceStatus": active,
        "numServeEndpoints": 1 if ready[0] == "True" else 0,
    }
    if observed is not None:
        status["observedGeneration"] = observed
    if upgrading or pending_app:
        status["pendingServiceStatus"] = {
            "rayClusterName": "mlp-fghij",
            "applicationStatuses": {"mlp": {"status": pending_app or "DEPLOYING", "message": "pending failed"}},
            "rayClusterStatus": {"desiredGPU": "2"}}
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(("state", "ready", "reason"), [
    (None, False, "RayInitializing"),
    (rayservice(ready=("False", "Initializing"), app="DEPLOYING"), False, "RayInitializing"),
    (rayservice(observed=2), False, "RayInitializing"),
    (rayservice(observed=None), False, "RayInitializing"),
    (rayservice(), True, "Serving"),
    (rayservice(app="DEPLOYING"), False, "ServeDeploying"),
    (rayservice(app="DEPLOY_FAILED", message="ImportError: no module named handlers"), False, "ServeDeployFailed"),
    (rayservice(pending_app="DEPLOY_FAILED", upgrading=True), False, "ServeDeployFailed"),
    (rayservice(app="UNHEALTHY", deployment="UNHEALTHY"), False, "ServeUnhealthy"),
    (rayservice(ready=("False", "ZeroServeEndpoints")), False, "NoServeEndpoints"),
    (rayservice(ready=("False", "InitializingTimeout")), False, "RayInitializingTimeout"),
])
def test_ready_needs_kuberays_ready_a_running_app_and_the_current_generation(
        state: dict[str, Any] | None, ready: bool, reason: str) -> None:
    view = ray_view(isvc(), state)
    assert view.ready[:2] == (ready, reason), view.ready


def test_deploy_failure_carries_serves_message_and_degraded_and_upgrading_are_said() -> None:
    assert "no module named handlers" in ray_view(
        isvc(), rayservice(app="DEPLOY_FAILED", message="ImportError: no module named handlers")).ready[2]
    degraded = ray_view(isvc(), rayservice(app="UNHEALTHY", deployment="UNHEALTHY")).degraded
    assert degraded[:2] == (True, "ServeDeploymentUnhealthy") and "replica died" in degraded[2]
    upgrading = ray_view(isvc(), rayservice(upgrading=True))
    assert upgrading.upgrading[0] and "mlp-fghij" in upgrading.upgrading[2]
    assert upgrading.gpus == 4  # the active and the pending cluster's GPUs while both exist
    assert ray_view(isvc(), rayservice()).upgrading[0] is False


def test_compute_status_for_engine_ray_reports_the_serve_url_and_four_conditions() -> None:
    status = compute_status(isvc(), rayservice(), [], 3, reconciled=APPLIED, settings=SETTINGS,
                            now="2026-11-26T00:00:00Z")
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions == {"Ready": ("True", "Serving"), "Reconciled": ("True", "Applied"),
                          "Degraded": ("False", "Healthy"), "Upgrading": ("False", "NoUpgrade")}
    assert status["url"] == "http://mlp-serve-svc.ns.svc.cluster.local:8000"
    assert status["ray"]["activeCluster"] == "mlp-abcde" and status["ray"]["appStatus"] == "RUNNING"
    assert (status["replicas"], status["readyReplicas"], status["gpus"]) == (2, 1, 2)


def test_the_head_follows_scheduling_without_the_gpu_toleration() -> None:
    scheduling = {"nodeSelector": {"pool": "inference"}, "tolerations": [{"key": "pool", "operator": "Exists"}]}
    rayservice = render_ray_service(isvc(resources={"gpus": 1}, scheduling=scheduling), SETTINGS)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    worker = worker_group(rayservice)["template"]["spec"]
    assert head["nodeSelector"] == worker["nodeSelector"] == {"pool": "inference"}
    assert head["tolerations"] == [{"key": "pool", "operator": "Exists"}]
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                     {"key": "pool", "operator": "Exists"}]


def test_the_rayservice_store_keeps_the_newest_whichever_source_comes_last() -> None:
    store = RayServices()
    key = ("ns", "mlp")

    def seen(version: str, app: str) -> dict[str, Any]:
        return {"metadata": {"generation": 1, "resourceVersion": version}, "status": {"state": app}}

    assert store.remember(key, seen("120", "DEPLOYING"))
    assert not store.remember(key, seen("120", "DEPLOYING"))  # the same version again: no news
    assert store.remember(key, seen("130", "RUNNING"))  # e.g. read directly by handlers.follow_ray_service
    assert not store.remember(key, seen("125", "DEPLOY_FAILED"))  # an older event arriving late is not news
    assert store.get(key) == {"metadata": {"generation": 1, "resourceVersion": "130"}, "status": {"state": "RUNNING"}}
    store.forget(key)
    assert store.get(key) is None and store.remember(key, seen("125", "DEPLOY_FAILED"))
