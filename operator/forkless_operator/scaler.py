"""KEDA's external scaler, served by the operator: the load of an InferenceService's replicas, read
from each ready pod's own /metrics. No Prometheus, no query for the user to write.

KEDA calls GetMetricSpec once (the target per replica) and GetMetrics every polling interval
(the total); its HPA then asks for ceil(total / target) replicas. A ready pod that does not answer
within the timeout counts as fully loaded, its queue limit (the trigger's `fullyLoaded`), never as
idle: a saturated server that cannot answer a scrape must not be scaled down.

The pure parts (parsing an exposition, summing) are separate from the I/O (listing pods through
the API server, fetching /metrics with aiohttp) and from the gRPC service, which runs in kopf's
own event loop (grpc.aio), started by the operator's startup handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from grpc import aio

from forkless_operator import externalscaler_pb2 as pb
from forkless_operator.apply import get_kube
from forkless_operator.spec import LOAD_METRICS

log = logging.getLogger("forkless.scaler")

SERVICE = "externalscaler.ExternalScaler"
RUNTIME_HTTP_PORT = 8080
SCRAPE_TIMEOUT_S = 2.0


def load_of(exposition: str, metric_name: str) -> float:
    """The sum of every sample of ``metric_name`` in a Prometheus text exposition (one per model)."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(metric_name) and line[len(metric_name):len(metric_name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ready_pod_ips(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """The addresses of the pods that are Ready and not terminating."""
    ips = []
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not (pod.get("metadata") or {}).get("deletionTimestamp"):
            ips.append(status["podIP"])
    return ips


@dataclass(frozen=True)
class Trigger:
    """The trigger metadata the operator rendered into the ScaledObject (forkless_operator.render)."""

    inference_service: str
    metric: str  # queueDepth or inFlight
    target: float
    fully_loaded: float

    @classmethod
    def of(cls, ref: pb.ScaledObjectRef) -> Trigger:
        meta = ref.scalerMetadata
        metric = meta.get("metric", "queueDepth")
        if metric not in LOAD_METRICS:
            raise ValueError(f"metric {metric!r}: the forkless scaler reads {', '.join(LOAD_METRICS)}")
        try:
            target = _quantity(meta.get("target", "4"))
            fully_loaded = _quantity(meta.get("fullyLoaded", "1000"))
        except ValueError as error:
            raise ValueError(f"trigger metadata of {ref.namespace}/{ref.name}: {error}") from None
        return cls(meta.get("inferenceService") or ref.name, metric, target, fully_loaded)


def _quantity(text: str) -> float:
    """A Quantity as render writes targets: plain, or milli-units ("1500m")."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


PodLister = Callable[[str, str], Awaitable[list[Mapping[str, Any]]]]


async def list_pods(namespace: str, name: str) -> list[Mapping[str, Any]]:
    """The InferenceService's runtime pods, through the API server (off the event loop)."""
    selector = f"app.kubernetes.io/name=forkless-runtime,app.kubernetes.io/instance={name}"
    body = await asyncio.to_thread(get_kube().request, "GET", f"/api/v1/namespaces/{namespace}/pods",
                                   query=[("labelSelector", selector)], timeout=10)
    items: list[Mapping[str, Any]] = body.get("items", [])
    return items


class Load:
    """Reads the total load of one InferenceService's ready replicas."""

    def __init__(self, pods: PodLister = list_pods, port: int = RUNTIME_HTTP_PORT) -> None:
        self.pods = pods
        self.port = port
        self.session: aiohttp.ClientSession | None = None

    async def scrape(self, ip: str) -> str:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        async with self.session.get(f"http://{ip}:{self.port}/metrics") as response:
            response.raise_for_status()
            return await response.text()

    async def total(self, namespace: str, trigger: Trigger) -> tuple[float, int]:
        """(total load, ready replicas): a replica that cannot be read counts as fully loaded."""
        ips = ready_pod_ips(await self.pods(namespace, trigger.inference_service))
        metric_name = LOAD_METRICS[trigger.metric]

        async def one(ip: str) -> float:
            try:
                return load_of(await self.scrape(ip), metric_name)
            except (aiohttp.ClientError, TimeoutError, ValueError, IndexError) as error:
                log.warning("%s/%s: pod %s did not report its load (%s): counted as fully loaded (%g)",
                            namespace, trigger.inference_service, ip, error or type(error).__name__,
                            trigger.fully_loaded)
                return trigger.fully_loaded

        loads = await asyncio.gather(*(one(ip) for ip in ips))
        return float(sum(loads)), len(ips)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class ExternalScaler:
    """KEDA's four RPCs on the InferenceService's load."""

    def __init__(self, load: Load) -> None:
        self.load = load

    async def IsActive(self, ref: pb.ScaledObjectRef, context: aio.ServicerContext) -> pb.IsActiveResponse:
        trigger = await self._trigger(ref, context)
        total, _ = await self.load.total(ref.namespace, trigger)
        return pb.IsActiveResponse(result=total > 0)

    async def GetMetricSpec(self, ref: pb.ScaledObjectRef, context: aio.ServicerContext) -> pb.GetMetricSpecResponse:
        trigger = await self._trigger(ref, context)
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=metric_name(trigger), targetSize=max(1, round(trigger.target)),
            targetSizeFloat=trigger.target)])

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: aio.ServicerContext) -> pb.GetMetricsResponse:
        trigger = await self._trigger(request.scaledObjectRef, context)
        total, replicas = await self.load.total(request.scaledObjectRef.namespace, trigger)
        log.debug("%s/%s: %s %g over %d ready replica(s)", request.scaledObjectRef.namespace,
                  trigger.inference_service, trigger.metric, total, replicas)
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=request.metricName or metric_name(trigger), metricValue=round(total),
            metricValueFloat=total)])

    async def StreamIsActive(self, ref: pb.ScaledObjectRef, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "use the external trigger (polling), not external-push")

    async def StreamMetricSpec(self, ref: pb.ScaledObjectRef, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the metric spec does not change; KEDA polls it")

    async def _trigger(self, ref: pb.ScaledObjectRef, context: aio.ServicerContext) -> Trigger:
        try:
            return Trigger.of(ref)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise  # abort raises; this line satisfies the type checker


def metric_name(trigger: Trigger) -> str:
    return f"forkless-{trigger.metric.lower()}"


def _handlers(service: ExternalScaler) -> grpc.GenericRpcHandler:
    def unary(method: Any, request: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    def stream(method: Any, request: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_stream_rpc_method_handler(method, request_deserializer=request.FromString,
                                                    response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
        "IsActive": unary(service.IsActive, pb.ScaledObjectRef),
        "GetMetricSpec": unary(service.GetMetricSpec, pb.ScaledObjectRef),
        "GetMetrics": unary(service.GetMetrics, pb.GetMetricsRequest),
        "StreamIsActive": stream(service.StreamIsActive, pb.ScaledObjectRef),
        "StreamMetricSpec": stream(service.StreamMetricSpec, pb.ScaledObjectRef),
    })


class ScalerServer:
    """The gRPC server, created inside the running loop (grpc.aio binds to the loop it is made in)."""

    def __init__(self, port: int, load: Load | None = None) -> None:
        self.port = port
        self.load = load or Load()
        self.server: aio.Server | None = None

    async def start(self) -> int:
        server = aio.server()
        server.add_generic_rpc_handlers((_handlers(ExternalScaler(self.load)),))
        bound = server.add_insecure_port(f"[::]:{self.port}")
        if bound == 0:
            raise OSError(f"cannot serve KEDA's external scaler on port {self.port} (in use?)")
        await server.start()
        self.server = server
        log.info("KEDA external scaler listening on port %d", bound)
        return bound

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(2)
            self.server = None
        await self.load.close()
