"""Scaling on load, end to end: KEDA (built from its Go module, hack/keda.sh) asks the operator's
external scaler for an InferenceService's queue, read from its real pods on the real node, and
the replicas follow a step of 64 clients up and come back down when it stops. Beside it, the same
model under a CPU HPA (metrics-server, also built here) takes the same step: the server waits
(as on a GPU) rather than computes, so its CPU stays low and the CPU HPA keeps one replica.

The model is a Python handler that takes 0.1 s a request on one worker without batching (about
10 requests/s a replica), so 64 clients keep every replica's queue full. What a user would see
is asserted: replicas from 1 to at least 3 within 60 s of the step, every answer correct, and 1
again after the load stops and the scale-down window passes. The timeline is printed for the
report (FORKLESS_SHOW_TIMELINE=1 keeps it in the output).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Helm, Kube, RealNode, beside_the_cluster, wait_for
from tests.realnode.conftest import install_operator, service_url

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(1800)]

ISVC = "inferenceservices.serving.forkless.dev"
NAME = "queued"
CPU_NAME = "cpu-scaled"
HANDLERS = REPO / "tests" / "runtime"
SCALER_IP = "10.96.0.91"  # the local cluster has no DNS: KEDA dials the operator's scaler here
CLIENTS = 64
SCALE_UP_WITHIN_S = 60


@pytest.fixture(scope="module")
def keda(kube: Kube, real_node: RealNode) -> Iterator[None]:
    with beside_the_cluster(kube, "keda.sh"):
        yield


@dataclass
class Deployed:
    namespace: str
    url: str
    cpu_url: str


def inference_service(name: str, autoscaling: dict[str, Any]) -> dict[str, Any]:
    """The handler that takes 0.1 s a request, mounted from the test tree, under ``autoscaling``."""
    return {
        "apiVersion": "serving.forkless.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
        "spec": {
            "model": {"name": NAME, "uri": "file:///opt/handlers", "format": "python", "handler": "handlers:Doubler"},
            "runtime": {"workers": 1, "threadsPerWorker": 1, "maxQueue": 512,
                        "env": [{"name": "TEST_HANDLER_DELAY_S", "value": "0.1"}]},
            "resources": {"cpu": "100m", "memory": "1Gi"},
            "scheduling": RealNode.scheduling(),
            "autoscaling": autoscaling,
            "podTemplate": {"spec": {
                "volumes": [{"name": "handlers", "hostPath": {"path": str(HANDLERS), "type": "Directory"}}],
                "containers": [{"name": "runtime", "env": [{"name": "PYTHONPATH", "value": "/opt/handlers"}],
                                "volumeMounts": [{"name": "handlers", "mountPath": "/opt/handlers",
                                                  "readOnly": True}]}]}},
        },
    }


def replicas(kube: Kube, namespace: str, name: str = NAME) -> tuple[int, int]:
    """(the Deployment's desired replicas, how many are ready)."""
    status = kube.json("get", "deployment", name, "-n", namespace)
    return int(status["spec"].get("replicas", 0)), int(status.get("status", {}).get("readyReplicas", 0))


@pytest.fixture(scope="module")
def deployed(kube: Kube, keda: None, helm: Helm) -> Iterator[Deployed]:
    namespace = f"keda-{int(time.time()) % 100000}"
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "forkless.test/scratch=true")
    try:
        install_operator(kube, helm, namespace, "forkless", "--set", f"scaler.clusterIP={SCALER_IP}",
                         "--set", f"scaler.address={SCALER_IP}:9091")
        kube.apply(inference_service(NAME, {"class": "keda", "metric": "queueDepth", "target": 4, "minReplicas": 1,
                                            "maxReplicas": 4, "scaleUpSeconds": 0, "scaleDownSeconds": 15}),
                   inference_service(CPU_NAME, {"class": "hpa", "metric": "cpu", "target": 50, "minReplicas": 1,
                                                "maxReplicas": 4, "scaleUpSeconds": 0, "scaleDownSeconds": 15}),
                   namespace=namespace)
        wait_for(lambda: replicas(kube, namespace) == (1, 1) and replicas(kube, namespace, CPU_NAME) == (1, 1),
                 300, "one ready replica of each")
        wait_for(lambda: len(kube.json("get", "hpa", "-n", namespace)["items"]) == 2, 120,
                 "KEDA's HPA for the ScaledObject, and the CPU HPA")
        yield Deployed(namespace, service_url(kube, namespace, NAME), service_url(kube, namespace, CPU_NAME))
    finally:
        kube.kubectl("delete", ISVC, NAME, CPU_NAME, "-n", namespace, "--wait=true", "--timeout=90s", check=False)
        helm("uninstall", "forkless", "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig, check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)


@dataclass
class Load:
    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, index: int) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [float(index)]}]}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/v2/models/{NAME}/infer", json=body)
                except httpx.TransportError as error:  # a connection cut by a pod leaving: retried by clients
                    time.sleep(0.2)
                    with self.lock:
                        self.wrong.append(f"transport: {error}")
                    continue
                with self.lock:
                    if response.status_code == 200 and response.json()["outputs"][0]["data"] == [2.0 * index]:
                        self.answered += 1
                    elif response.status_code != 503:  # full queue: back-pressure, the client retries
                        self.wrong.append(f"{response.status_code} {response.text[:200]}")


def test_a_step_to_64_clients_scales_out_on_queue_depth_and_back_when_it_stops(kube: Kube,
                                                                              deployed: Deployed) -> None:
    timeline: list[tuple[float, int, int, int, str]] = []
    loads = [Load(deployed.url), Load(deployed.cpu_url)]
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for load in loads for i in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    reached: float | None = None
    try:
        while time.monotonic() - started < SCALE_UP_WITHIN_S:  # the whole minute: the CPU HPA reads slowly
            desired, ready = replicas(kube, deployed.namespace)
            cpu_desired, _ = replicas(kube, deployed.namespace, CPU_NAME)
            timeline.append((round(time.monotonic() - started, 1), desired, ready, cpu_desired,
                             cpu_utilization(kube, deployed.namespace)))
            if desired >= 3 and reached is None:
                reached = time.monotonic() - started
            time.sleep(2)
    finally:
        for load in loads:
            load.stop.set()
        stopped = time.monotonic()  # clients finish the request they hold (up to a queue's wait) and leave
        for thread in threads:
            thread.join(timeout=70)
    down: float | None = None
    while time.monotonic() - stopped < 240:
        desired, ready = replicas(kube, deployed.namespace)
        timeline.append((round(time.monotonic() - started, 1), desired, ready,
                         replicas(kube, deployed.namespace, CPU_NAME)[0], cpu_utilization(kube, deployed.namespace)))
        if desired == 1:
            down = time.monotonic() - stopped
            break
        time.sleep(2)
    print("\ntimeline (s since the step, queue-scaled desired, ready, CPU-scaled desired, CPU utilization):")
    print(timeline)
    print(f"queue depth: replicas >= 3 after {reached}s, back to 1 {down}s after the load stopped; "
          f"{loads[0].answered} answered; CPU HPA: at most {max(t[3] for t in timeline)} replica(s), "
          f"{loads[1].answered} answered")
    assert reached is not None and reached <= SCALE_UP_WITHIN_S, timeline
    for load in loads:
        assert load.answered > 0 and len(load.wrong) <= load.answered // 100, load.wrong[:5]
    assert down is not None, timeline
    # The CPU HPA really measured (metrics-server answered), and saw a server that waits, not computes.
    assert any(t[4] not in ("", "<unknown>") for t in timeline), timeline


def cpu_utilization(kube: Kube, namespace: str) -> str:
    """The CPU HPA's current utilization, as it reports it ("" before its first reading)."""
    hpa = kube.json("get", "hpa", CPU_NAME, "-n", namespace)
    for metric in hpa.get("status", {}).get("currentMetrics") or []:
        current = metric.get("resource", {}).get("current", {})
        if "averageUtilization" in current:
            return f"{current['averageUtilization']}%"
    return ""


def test_the_scaler_reports_the_load_keda_asks_for(kube: Kube, deployed: Deployed) -> None:
    """KEDA's metrics API (served by its adapter through the aggregator) answers for the ScaledObject."""
    scaled = kube.json("get", "scaledobjects.keda.sh", NAME, "-n", deployed.namespace)
    metric = scaled["status"]["externalMetricNames"][0]
    raw = kube.kubectl("get", "--raw", f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{deployed.namespace}/"
                       f"{metric}?labelSelector=scaledobject.keda.sh%2Fname%3D{NAME}").stdout
    assert '"value":"0"' in raw or '"value": "0"' in raw, raw  # idle now: the queue is empty
    conditions: dict[str, Any] = {c["type"]: c for c in scaled["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "True", conditions
