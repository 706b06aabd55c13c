"""spec.autoscaling: which autoscaler each class and metric renders, and the operator's external scaler
for KEDA reading real runtime servers' /metrics."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from forkless_operator import externalscaler_pb2 as pb
from forkless_operator import spec
from forkless_operator.render import render_children
from forkless_operator.scaler import Load, ScalerServer, load_of, ready_pod_ips
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService
from pydantic import ValidationError

from tests.runtime.conftest import free_port, start_server

SETTINGS = Settings(runtime_image="r:1", scaler_address="10.96.0.91:9091")


def isvc(autoscaling: dict[str, Any], **spec_fields: Any) -> InferenceService:
    return InferenceService.model_validate({
        "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
        "spec": {"model": {"uri": "file:///m.pt"}, "resources": {"cpu": "1"}, "autoscaling": autoscaling,
                 **spec_fields}})


def children(autoscaling: dict[str, Any], settings: Settings = SETTINGS, **spec_fields: Any) -> dict[str, Any]:
    return render_children(isvc(autoscaling, **spec_fields), settings)


def test_cpu_is_an_hpa_on_utilization_as_before() -> None:
    rendered = children({"maxReplicas": 4, "targetCPUUtilization": 70, "scaleDownSeconds": 120})
    assert rendered["ScaledObject"] is None
    hpa = rendered["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert hpa["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 120}}
    assert "replicas" not in rendered["Deployment"]["spec"]


def test_a_load_metric_under_class_hpa_reads_the_pods_gauge_per_pod() -> None:
    hpa = children({"maxReplicas": 4, "metric": "inFlight", "target": 2.5})["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "forkless_requests_in_flight"},
                                                       "target": {"type": "AverageValue", "averageValue": "2500m"}}}]


def test_class_keda_is_a_scaled_object_whose_trigger_is_the_operator() -> None:
    rendered = children({"class": "keda", "metric": "queueDepth", "target": 8, "minReplicas": 1, "maxReplicas": 5,
                         "scaleUpSeconds": 0}, runtime={"maxQueue": 64})
    assert rendered["HorizontalPodAutoscaler"] is None
    scaled = rendered["ScaledObject"]
    assert (scaled["apiVersion"], scaled["kind"], scaled["metadata"]["name"]) == ("keda.sh/v1alpha1", "ScaledObject", "m")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 5)
    # Every metadata value a string: KEDA's CRD refuses numbers there.
    assert scaled["spec"]["triggers"] == [{"type": "external", "metadata": {
        "scalerAddress": "10.96.0.91:9091", "metric": "queueDepth", "target": "8", "inferenceService": "m",
        "fullyLoaded": "64"}}]
    assert scaled["spec"]["advanced"] == {"horizontalPodAutoscalerConfig": {"behavior": {
        "scaleUp": {"stabilizationWindowSeconds": 0}}}}
    assert "replicas" not in rendered["Deployment"]["spec"]


def test_class_keda_with_a_prometheus_is_one_summed_query() -> None:
    scaled = children({"class": "keda", "metric": "inFlight", "maxReplicas": 3},
                      Settings(runtime_image="r:1", prometheus_address="http://prometheus:9090"))["ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {"serverAddress": "http://prometheus:9090", "threshold": "8",
                                   "query": 'sum(forkless_requests_in_flight{namespace="ns",pod=~"m-[a-z0-9]+-[a-z0-9]+"})'}


def test_class_external_renders_no_autoscaler_and_leaves_replicas_alone() -> None:
    rendered = children({"class": "external", "maxReplicas": 3}, resources={})
    assert rendered["HorizontalPodAutoscaler"] is None and rendered["ScaledObject"] is None
    assert "replicas" not in rendered["Deployment"]["spec"]


@pytest.mark.parametrize(("autoscaling", "rule"), [
    ({"class": "keda", "maxReplicas": 3}, spec.KEDA_NEEDS_LOAD_METRIC_RULE),
    ({"metric": "queueDepth", "targetCPUUtilization": 50, "maxReplicas": 3}, spec.CPU_TARGET_IS_CPU_RULE),
    ({"target": 150, "maxReplicas": 3}, spec.CPU_TARGET_PERCENT_RULE),
    ({"minReplicas": 4, "maxReplicas": 3, "metric": "queueDepth"}, spec.MIN_MAX_REPLICAS_RULE),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(autoscaling: dict[str, Any], rule: spec.Rule) -> None:
    with pytest.raises(ValidationError, match=re.escape(rule.message)):
        isvc(autoscaling)


def test_a_target_must_be_positive_and_cpu_needs_a_cpu_request() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        isvc({"metric": "queueDepth", "target": 0, "maxReplicas": 3})
    with pytest.raises(ValidationError, match=re.escape(spec.AUTOSCALING_NEEDS_CPU_RULE.message)):
        isvc({"maxReplicas": 3}, resources={})
    isvc({"class": "keda", "metric": "queueDepth", "maxReplicas": 3}, resources={})  # no CPU request needed


# --- the external scaler against real runtime servers ------------------------------------------------


def test_the_exposition_is_summed_over_models_and_only_ready_pods_count() -> None:
    text = ('# HELP forkless_queue_depth x\nforkless_queue_depth{model="a"} 3\nforkless_queue_depth{model="b"} 4\n'
            'forkless_queue_depth_total 99\n')
    assert load_of(text, "forkless_queue_depth") == 7
    pods = [{"status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"status": {"podIP": "10.0.0.2", "conditions": [{"type": "Ready", "status": "False"}]}},
            {"metadata": {"deletionTimestamp": "x"},
             "status": {"podIP": "10.0.0.3", "conditions": [{"type": "Ready", "status": "True"}]}}]
    assert ready_pod_ips(pods) == ["10.0.0.1"]


def ready_pod(ip: str) -> dict[str, Any]:
    return {"status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture
def loaded_server(tmp_path: Path) -> Iterator[tuple[Any, list[httpx.Response]]]:
    """A real runtime whose one worker takes 0.3 s a request, with 12 requests sent at once."""
    server = start_server(tmp_path, "--model-name", "slow", "--handler", "handlers:Doubler", "--max-batch-size", "1",
                          env={"TEST_HANDLER_DELAY_S": "0.3"})
    answers: list[httpx.Response] = []
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}

    def send() -> None:
        with httpx.Client(timeout=60) as client:
            answers.append(client.post(f"{server.url}/v2/models/slow/infer", json=body))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while server.metric("forkless_queue_depth") < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    yield server, answers
    for thread in threads:
        thread.join()
    server.stop()


def test_kedas_calls_get_the_load_of_the_ready_replicas_and_a_silent_one_counts_as_full(loaded_server) -> None:
    server, _answers = loaded_server
    silent = "127.0.0.2"  # nothing listens there: a replica that cannot report

    async def pods(namespace: str, name: str) -> list[dict[str, Any]]:  # what the API server lists for "m"
        assert (namespace, name) == ("ns", "m")
        return [ready_pod("127.0.0.1"), ready_pod(silent)]

    async def ask() -> tuple[pb.GetMetricSpecResponse, pb.GetMetricsResponse, pb.IsActiveResponse]:
        scaler = ScalerServer(0, Load(pods, port=server.port))
        port = await scaler.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ref = pb.ScaledObjectRef(name="m", namespace="ns", scalerMetadata={
                    "metric": "queueDepth", "target": "4", "inferenceService": "m", "fullyLoaded": "100"})
                spec_ = await channel.unary_unary("/externalscaler.ExternalScaler/GetMetricSpec",
                                                  request_serializer=pb.ScaledObjectRef.SerializeToString,
                                                  response_deserializer=pb.GetMetricSpecResponse.FromString)(ref)
                metrics = await channel.unary_unary("/externalscaler.ExternalScaler/GetMetrics",
                                                    request_serializer=pb.GetMetricsRequest.SerializeToString,
                                                    response_deserializer=pb.GetMetricsResponse.FromString)(
                    pb.GetMetricsRequest(scaledObjectRef=ref, metricName="s0-forkless-queuedepth"))
                active = await channel.unary_unary("/externalscaler.ExternalScaler/IsActive",
                                                   request_serializer=pb.ScaledObjectRef.SerializeToString,
                                                   response_deserializer=pb.IsActiveResponse.FromString)(ref)
                return spec_, metrics, active
        finally:
            await scaler.stop()

    metric_spec, metrics, active = asyncio.run(ask())
    assert [(m.metricName, m.targetSizeFloat) for m in metric_spec.metricSpecs] == [("forkless-queuedepth", 4.0)]
    (value,) = metrics.metricValues
    assert value.metricName == "s0-forkless-queuedepth"
    # The live server's queue (at most the 12 sent, one of them running) plus 100 for the silent replica.
    assert 100 + 1 <= value.metricValueFloat <= 100 + 11
    assert active.result
    assert server.metric("forkless_requests_in_flight") >= server.metric("forkless_queue_depth")


def test_a_trigger_with_a_metric_the_scaler_cannot_read_is_refused() -> None:
    async def ask() -> grpc.StatusCode:
        async def pods(namespace: str, name: str) -> list[dict[str, Any]]:
            return []

        scaler = ScalerServer(0, Load(pods, port=free_port()))
        port = await scaler.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/externalscaler.ExternalScaler/GetMetricSpec",
                                           request_serializer=pb.ScaledObjectRef.SerializeToString,
                                           response_deserializer=pb.GetMetricSpecResponse.FromString)
                try:
                    await call(pb.ScaledObjectRef(name="m", namespace="ns", scalerMetadata={"metric": "gpu"}))
                except grpc.aio.AioRpcError as error:
                    assert "the forkless scaler reads queueDepth, inFlight" in (error.details() or "")
                    return error.code()
                return grpc.StatusCode.OK
        finally:
            await scaler.stop()

    assert asyncio.run(ask()) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_committed_scaler_messages_are_generated_from_the_proto(tmp_path: Path) -> None:
    """One source: proto/externalscaler.proto; `make proto` regenerates what the operator imports."""
    import subprocess
    import sys

    package = Path(__file__).resolve().parents[2] / "operator" / "forkless_operator"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{package / 'proto'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", "externalscaler.proto"], check=True)
    for name in ("externalscaler_pb2.py", "externalscaler_pb2.pyi"):
        assert (tmp_path / name).read_bytes() == (package / name).read_bytes(), f"{name} is stale: run make proto"
