"""The front-end's HTTP routes as a raw ASGI application: KServe V1, Open Inference Protocol V2,
health and metrics.

Raw ASGI on purpose: the hot path (body -> codec -> batcher -> response) does no per-request
framework work, which is most of the cost of a light model. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .. import __version__
from ..batching.batcher import Batcher, Request
from ..errors import Draining, NotReady, RequestTimeout, ServingError
from ..pool.supervisor import ModelSettingsRefused, WorkerPool
from ..protocol import v1, v2
from ..protocol.tensors import NamedTensor, ProtocolError
from ..settings import Settings
from . import openapi
from .metrics import Metrics

log = logging.getLogger("forkless.frontend")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
_JSON_HEADERS = [(b"content-type", JSON)]


class BodyTooLarge(Exception):
    pass


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self.metrics = Metrics(settings.model_name)
        self.batcher = Batcher(settings.max_batch_size, settings.max_batch_delay_ms / 1000, settings.max_queue)
        self.pool = WorkerPool(settings, self.batcher, self.metrics, self.fatal)
        self.leaving = False  # SIGTERM seen: unready, connections closed after each answer
        self.draining = False  # new requests refused
        self.fatal_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.max_body = int(settings.max_body_mb * 1024 * 1024)
        self._v2_prefix = f"/v2/models/{self.model_name}"
        self._v1_model = f"/v1/models/{self.model_name}"

    # --- lifecycle ------------------------------------------------------------------------------
    def fatal(self, message: str) -> None:
        log.error("%s; exiting", message)
        self.fatal_error = message
        self.batcher.fail_all(NotReady(message))
        if self.on_fatal is not None:
            self.on_fatal()

    def ready(self) -> bool:
        return not self.leaving and self.fatal_error is None and self.pool.ready_count() > 0

    async def drain(self, delay_s: float, grace_s: float) -> None:
        """Leave without losing a request: stop being chosen, then refuse new work, then finish.

        For ``delay_s`` the server keeps serving while readiness is false and every answer
        closes its connection: a Service (kube-proxy) or load balancer stops sending new
        connections here, and clients with kept-alive connections reconnect elsewhere. Only
        then are new requests refused (503), and queued and in-flight ones get ``grace_s``.
        """
        self.leaving = True
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        self.draining = True
        deadline = time.monotonic() + grace_s
        while (len(self.batcher) or self.pool.inflight_count()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = len(self.batcher) + self.pool.inflight_count()
        if left:
            log.warning("grace period over: %d request(s) unfinished are answered 503", left)
        self.batcher.fail_all(Draining("the server is shutting down"))

    # --- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.pool.start()
                except Exception as exc:
                    log.error("cannot start the workers: %s", exc)
                    if isinstance(exc, ModelSettingsRefused):
                        self.fatal_error = str(exc)  # reported as ModelLoadFailed on exit
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.pool.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if method == "POST":
                if path.startswith(self._v2_prefix) and path.endswith("/infer"):
                    if self._version_ok(path[len(self._v2_prefix) : -len("/infer")]):
                        return await self._infer_v2(scope, receive, send)
                elif path == self._v1_model + ":predict":
                    return await self._predict_v1(scope, receive, send)
                if path.startswith(("/v2/models/", "/v1/models/")):
                    return await self._unknown_model(path, send)
                return await respond(send, 404, error_body(f"no route POST {path}"))
            if method in ("GET", "HEAD"):
                return await self._get(path, send)
            return await respond(send, 405, error_body(f"method {method} is not allowed on {path}"))
        except ProtocolError as exc:
            return await respond(send, 400, error_body(str(exc)))

    def _version_ok(self, middle: str) -> bool:
        """'' or '/versions/<v>' between the model name and the verb."""
        return middle == "" or (middle.startswith("/versions/") and "/" not in middle[len("/versions/"):])

    async def _get(self, path: str, send: Send) -> None:
        if path == "/v2/health/ready" or path == "/v1/health/ready":
            ready = self.ready()
            return await respond(send, 200 if ready else 503, orjson.dumps({"ready": ready}))
        if path == "/v2/health/live" or path == "/v1/health/live" or path == "/healthz":
            return await respond(send, 200, b'{"live":true}')
        if path == "/metrics":
            workers = [(w.slot, w.pid, w.ready) for w in self.pool.workers]
            body = self.metrics.render(len(self.batcher), workers, self.pool.gpu_memory(), self.pool.peak_memory())
            return await respond(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8")
        if path == "/openapi.json":
            return await respond(send, 200, orjson.dumps(openapi.document(self.model_name, self.pool.metadata)))
        if path == "/v2":
            return await respond(send, 200, orjson.dumps({
                "name": "forkless-runtime", "version": __version__, "extensions": ["binary_tensor_data"]}))
        if path.startswith(self._v2_prefix):
            rest = path[len(self._v2_prefix):]
            if rest.endswith("/ready") and self._version_ok(rest[: -len("/ready")]):
                ready = self.ready()
                return await respond(send, 200 if ready else 503, orjson.dumps({"name": self.model_name, "ready": ready}))
            if self._version_ok(rest):
                return await respond(send, 200, orjson.dumps(self.model_metadata()))
        if path == self._v1_model:
            return await respond(send, 200, orjson.dumps({"name": self.model_name, "ready": self.ready()}))
        if path == "/v1/models":
            return await respond(send, 200, orjson.dumps({"models": [self.model_name]}))
        if path.startswith(("/v2/models/", "/v1/models/")):
            return await self._unknown_model(path, send)
        return await respond(send, 404, error_body(f"no route GET {path}"))

    async def _unknown_model(self, path: str, send: Send) -> None:
        name = path.split("/")[3].split(":")[0] if path.count("/") >= 3 else ""
        if name == self.model_name:  # the model exists; the rest of the path does not (GET .../infer)
            return await respond(send, 404, error_body(f"no such route for model {name!r}: {path}"))
        await respond(send, 404, error_body(f"unknown model {name!r}; this server serves {self.model_name!r}"))

    def model_metadata(self) -> dict[str, Any]:
        meta = self.pool.metadata or {}
        return {
            "name": self.model_name,
            "versions": ["1"],
            "platform": meta.get("platform", self.settings.resolved_format),
            "inputs": meta.get("inputs", []),
            "outputs": meta.get("outputs", []),
            "parameters": {"batchable": bool(meta.get("batchable")), "max_batch_size": self.settings.max_batch_size,
                           "workers": len(self.pool.workers), "workers_auto": self.pool.auto_decision,
                           "precision": meta.get("precision", self.settings.precision),
                           "warm_up": meta.get("warm_up", {}), "notes": meta.get("notes", [])},
        }

    # --- inference --------------------------------------------------------------------------
    async def _infer_v2(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inference("v2", scope, receive, send, self._handle_v2)

    async def _predict_v1(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inference("v1", scope, receive, send, self._handle_v1)

    async def _inference(self, protocol: str, scope: Scope, receive: Receive, send: Send,
                         handle: Callable[[Scope, bytes], Awaitable[tuple[bytes, list[tuple[bytes, bytes]]]]]) -> None:
        """Read, decode, infer, encode; every outcome is counted and answered, none escapes."""
        started = time.perf_counter()
        status, headers = 200, _JSON_HEADERS
        try:
            payload, headers = await handle(scope, await self._read_body(scope, receive))
        except ServingError as exc:
            status, payload, headers = exc.status, error_body(str(exc)), _error_headers(exc)
        except ProtocolError as exc:
            status, payload = 400, error_body(str(exc))
        except BodyTooLarge:
            status, payload = 413, error_body(f"request body larger than {self.settings.max_body_mb:g} MB")
        self.metrics.requests[(protocol, status)] += 1
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        if self.leaving:
            headers = [*headers, (b"connection", b"close")]
        await respond(send, status, payload, headers=headers)

    async def _handle_v2(self, scope: Scope, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        header_length: int | None = None
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                try:
                    header_length = int(value)
                except ValueError:
                    raise ProtocolError(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
        request = v2.decode_request(body, header_length)
        outputs = await self.infer(request.inputs)
        payload, json_length = v2.encode_response(self.model_name, request, outputs)
        if json_length is None:
            return payload, _JSON_HEADERS
        return payload, [(b"content-type", b"application/octet-stream"),
                         (b"inference-header-content-length", str(json_length).encode())]

    async def _handle_v1(self, scope: Scope, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        inputs = v1.decode_request(body, (self.pool.metadata or {}).get("inputs", []))
        return v1.encode_response(await self.infer(inputs)), _JSON_HEADERS

    async def infer(self, inputs: list[NamedTensor]) -> list[NamedTensor]:
        """Queue the inputs for the batcher and wait for this request's slice of the outputs."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        meta = self.pool.metadata
        if meta is None:
            raise NotReady("the model is still loading" if self.fatal_error is None else self.fatal_error)
        check_inputs(inputs, meta.get("inputs") or [], meta.get("platform", ""))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = Request(inputs, future, meta.get("batchable", False) and self.settings.max_batch_size > 1)
        if self.settings.request_timeout_s > 0:
            request.deadline = time.time() + self.settings.request_timeout_s
            request.timer = loop.call_later(self.settings.request_timeout_s, _expire, future,
                                            self.settings.request_timeout_s)
        try:
            self.pool.submit(request)
        except ServingError:
            if request.timer is not None:
                request.timer.cancel()
            raise
        return await future

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise BodyTooLarge
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > self.max_body:
                raise BodyTooLarge
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)


def _expire(future: asyncio.Future, timeout: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(f"no answer within the request timeout of {timeout:g} s"))


def check_inputs(inputs: list[NamedTensor], declared: list[dict[str, Any]], platform: str = "") -> None:
    """Reject what the model's metadata says it cannot take, with a 400 instead of a model crash."""
    if platform.startswith("pytorch"):
        for tensor in inputs:
            if tensor.array.dtype == object:
                raise ProtocolError(f"input {tensor.name!r}: a PyTorch model takes numeric tensors, not BYTES")
    if not declared:
        return
    if len(inputs) != len(declared):
        names = ", ".join(spec["name"] for spec in declared)
        raise ProtocolError(f"the model takes {len(declared)} input(s) ({names}), got {len(inputs)}")
    by_name = {spec["name"]: spec for spec in declared}
    matched = all(t.name in by_name for t in inputs)
    for position, tensor in enumerate(inputs):
        spec = by_name[tensor.name] if matched else declared[position]
        if spec["datatype"] and tensor.datatype != spec["datatype"]:
            raise ProtocolError(f"input {tensor.name!r}: the model expects {spec['datatype']}, got {tensor.datatype}")
        shape = spec["shape"]
        if len(shape) > 1 or (shape and shape[0] != -1):
            actual = tensor.array.shape
            if len(actual) != len(shape) or any(d != -1 and d != a for d, a in zip(shape, actual, strict=True)):
                raise ProtocolError(f"input {tensor.name!r}: the model expects shape {shape}, got {list(actual)}")


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _error_headers(exc: ServingError) -> list[tuple[bytes, bytes]]:
    if exc.retry_after is None:
        return _JSON_HEADERS
    return [(b"content-type", JSON), (b"retry-after", str(exc.retry_after).encode())]


async def respond(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    if headers is None:
        headers = [(b"content-type", content_type)]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
