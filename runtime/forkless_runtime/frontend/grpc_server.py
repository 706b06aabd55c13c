"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) on --grpc-port.

A grpc.aio server in the front-end's own event loop (started in the ASGI lifespan, so it shares
uvicorn's loop): ModelInfer goes through the same models, batchers, queue limits, timeouts,
metrics, statistics and drain as HTTP, and errors carry the same messages with the gRPC code that
matches their HTTP status. The methods are registered by hand (no generated stub module): six
unary calls of the generated messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from .. import __version__
from ..errors import QueueFull, ServingError
from ..protocol import grpc_service_pb2 as pb
from ..protocol import grpc_v2, kserve_passthrough
from ..protocol.tensors import ProtocolError
from .app import EXTENSIONS, App

log = logging.getLogger("forkless.grpc")

SERVICE = "inference.GRPCInferenceService"

# HTTP status of a ServingError -> gRPC code (the message is the same on both).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(error: Exception) -> tuple[grpc.StatusCode, int]:
    """The gRPC code and the HTTP status a failure is counted under."""
    if isinstance(error, ProtocolError):
        return grpc.StatusCode.INVALID_ARGUMENT, 400
    if isinstance(error, QueueFull):  # as Ray Serve answers a full queue: clients back off
        return grpc.StatusCode.RESOURCE_EXHAUSTED, 503
    status = error.status if isinstance(error, ServingError) else 500
    return CODES.get(status, grpc.StatusCode.INTERNAL), status


class InferenceService:
    """The six RPCs, each a thin call into the App."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.app.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        model = await self._model(request.name, context)
        return pb.ModelReadyResponse(ready=model.ready() and not self.app.leaving and self.app.fatal_error is None)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="forkless-runtime", version=__version__, extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = await self._model(request.name, context)
        return grpc_v2.model_metadata(model.metadata())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        started = time.perf_counter()
        model = await self._model(request.model_name, context)
        try:
            if model.passes_through:
                response = await self._pass_through(model, request, context)
                self._count(model, 200, started)
                return response
            decoded = grpc_v2.decode_request(request)
            outputs = await self.app.infer(model, decoded.inputs, decoded.parameters)
            response = grpc_v2.encode_response(model.name, decoded, outputs)
        except (ServingError, ProtocolError) as error:
            code, status = code_of(error)
            self._count(model, status, started)
            await context.abort(code, str(error))
        self._count(model, 200, started)
        return response

    async def _pass_through(self, model: Any, request: pb.ModelInferRequest,
                            context: aio.ServicerContext) -> pb.ModelInferResponse:
        """A KServe model decodes KServe's own message: the same fields, so the bytes pass unchanged."""
        metadata = {key: value if isinstance(value, str) else value.decode("latin-1")
                    for key, value in context.invocation_metadata() or ()}
        call = kserve_passthrough.Call("grpc", "predict", metadata, request.SerializeToString())
        _headers, payload = await self.app.pass_through(model, call)
        return pb.ModelInferResponse.FromString(payload)

    @staticmethod
    def _count(model: Any, status: int, started: float) -> None:
        model.metrics.requests[("grpc", status)] += 1
        model.metrics.request_seconds.observe(time.perf_counter() - started)

    async def _model(self, name: str, context: aio.ServicerContext) -> Any:
        try:
            return self.app.model(name)
        except ServingError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))


def _unary(method: Callable[[Any, aio.ServicerContext], Awaitable[Any]], request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request_type.FromString,
        response_serializer=lambda message: message.SerializeToString())


def handler(service: InferenceService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "ServerLive": _unary(service.ServerLive, pb.ServerLiveRequest),
        "ServerReady": _unary(service.ServerReady, pb.ServerReadyRequest),
        "ModelReady": _unary(service.ModelReady, pb.ModelReadyRequest),
        "ServerMetadata": _unary(service.ServerMetadata, pb.ServerMetadataRequest),
        "ModelMetadata": _unary(service.ModelMetadata, pb.ModelMetadataRequest),
        "ModelInfer": _unary(service.ModelInfer, pb.ModelInferRequest),
    })


class GrpcServer:
    """Created and started inside the running loop (grpc.aio objects bind to the loop they are made in)."""

    def __init__(self, app: App, host: str, port: int, max_message_bytes: int) -> None:
        self.app = app
        self.address = f"{'[::]' if host in ('0.0.0.0', '::') else host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.server: aio.Server | None = None

    async def start(self) -> None:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", -1),
                   ("grpc.so_reuseport", 0)]
        server = aio.server(options=options)
        server.add_generic_rpc_handlers((handler(InferenceService(self.app)),))
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {self.address} (in use?); --grpc-port 0 turns gRPC off")
        await server.start()
        self.server = server
        log.info("gRPC (Open Inference Protocol) listening on %s", self.address)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
