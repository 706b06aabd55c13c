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
from ..errors import AnsweredError, Draining, NotReady, ServingError, UnknownModel
from ..pool.supervisor import ModelSettingsRefused
from ..protocol import kserve_passthrough, v1, v2
from ..protocol.tensors import NamedTensor, ProtocolError
from ..settings import Settings
from . import openapi
from .metrics import merge_expositions
from .models import CLIENT_GONE, ServedModel

log = logging.getLogger("forkless.frontend")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
_JSON_HEADERS = [(b"content-type", JSON)]


class BodyTooLarge(Exception):
    pass


class App:
    def __init__(self, settings: Settings, models: list[Settings] | None = None) -> None:
        """``models``: one Settings per served model (frontend/models.py); ``settings``'s own model alone
        when not given."""
        self.settings = settings
        chosen = models if models is not None else [settings]
        self.models: dict[str, ServedModel] = {
            m.model_name: ServedModel(m, self.fatal, len(chosen)) for m in chosen}
        self.names = list(self.models)
        self.leaving = False  # SIGTERM seen: unready, connections closed after each answer
        self.draining = False  # new requests refused
        self.fatal_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        # Set by the server: the gRPC server starts in the lifespan (inside uvicorn's loop) and stops there.
        self.on_started: Callable[[], Awaitable[None]] | None = None
        self.on_stopping: Callable[[], Awaitable[None]] | None = None
        self.max_body = int(settings.max_body_mb * 1024 * 1024)

    # --- lifecycle ------------------------------------------------------------------------------
    def fatal(self, message: str) -> None:
        log.error("%s; exiting", message)
        self.fatal_error = message
        for model in self.models.values():
            model.fatal_error = message
            model.batcher.fail_all(NotReady(message))
        if self.on_fatal is not None:
            self.on_fatal()

    def ready(self) -> bool:
        """Every model can serve: a pod serving several models is ready when all of them are."""
        return not self.leaving and self.fatal_error is None and all(m.ready() for m in self.models.values())

    def queued(self) -> int:
        return sum(len(m.batcher) + m.pool.inflight_count() for m in self.models.values())

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
        while self.queued() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = self.queued()
        if left:
            log.warning("grace period over: %d request(s) unfinished are answered 503", left)
        for model in self.models.values():
            model.batcher.fail_all(Draining("the server is shutting down"))

    async def start(self) -> None:
        await asyncio.gather(*(m.pool.start() for m in self.models.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(m.pool.stop() for m in self.models.values()))

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
                    await self.start()
                    if self.on_started is not None:
                        await self.on_started()
                except Exception as exc:
                    log.error("cannot start: %s", exc)
                    if isinstance(exc, ModelSettingsRefused):
                        self.fatal_error = str(exc)  # reported as ModelLoadFailed on exit
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.on_stopping is not None:
                    await self.on_stopping()
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(name, self.names)
        return model

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if method == "POST":
                if path.startswith("/v2/models/"):
                    name, verb = _model_path(path)
                    if verb == "infer":
                        return await self._inference("v2", name, scope, receive, send, self._handle_v2)
                    if verb is not None:
                        self.model(name)
                        return await respond(send, 404, error_body(f"no route POST {path}"))
                elif path.startswith("/v1/models/") and path.endswith(":predict"):
                    name = path[len("/v1/models/"):-len(":predict")]
                    return await self._inference("v1", name, scope, receive, send, self._handle_v1)
                elif path.startswith("/v1/models/") and path.endswith(":explain"):
                    name = path[len("/v1/models/"):-len(":explain")]
                    return await self._inference("v1", name, scope, receive, send, self._handle_v1_explain)
                elif path == "/v2/repository/index":
                    return await respond(send, 200, orjson.dumps(self.repository_index()))
                return await respond(send, 404, error_body(f"no route POST {path}"))
            if method in ("GET", "HEAD"):
                return await self._get(path, send)
            return await respond(send, 405, error_body(f"method {method} is not allowed on {path}"))
        except ProtocolError as exc:
            return await respond(send, 400, error_body(str(exc)))
        except ServingError as exc:
            return await respond(send, exc.status, error_body(str(exc)), headers=_error_headers(exc))

    async def _get(self, path: str, send: Send) -> None:
        if path == "/v2/health/ready" or path == "/v1/health/ready":
            ready = self.ready()
            body = {"ready": ready, "models": {name: m.ready() for name, m in self.models.items()}}
            return await respond(send, 200 if ready else 503, orjson.dumps(body))
        if path == "/v2/health/live" or path == "/v1/health/live" or path == "/healthz":
            return await respond(send, 200, b'{"live":true}')
        if path == "/metrics":
            return await respond(send, 200, self.render_metrics(), b"text/plain; version=0.0.4; charset=utf-8")
        if path == "/openapi.json":
            first = self.models[self.names[0]]
            return await respond(send, 200, orjson.dumps(openapi.document(self.names, first.pool.metadata)))
        if path == "/v2":
            return await respond(send, 200, orjson.dumps(self.server_metadata()))
        if path == "/v2/models/stats":
            return await respond(send, 200, orjson.dumps(
                {"model_stats": [m.metrics.statistics() for m in self.models.values()]}))
        if path.startswith("/v2/models/"):
            name, verb = _model_path(path)
            model = self.model(name)
            if verb == "ready":
                ready = model.ready() and not self.leaving and self.fatal_error is None
                return await respond(send, 200 if ready else 503, orjson.dumps({"name": name, "ready": ready}))
            if verb == "":
                return await respond(send, 200, orjson.dumps(model.metadata()))
            if verb == "stats":
                return await respond(send, 200, orjson.dumps({"model_stats": [model.metrics.statistics()]}))
            return await respond(send, 404, error_body(f"no such route for model {name!r}: {path}"))
        if path == "/v1/models":
            return await respond(send, 200, orjson.dumps({"models": self.names}))
        if path.startswith("/v1/models/"):
            model = self.model(path[len("/v1/models/"):])
            return await respond(send, 200, orjson.dumps({"name": model.name, "ready": model.ready()}))
        return await respond(send, 404, error_body(f"no route GET {path}"))

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "forkless-runtime", "version": __version__, "extensions": list(EXTENSIONS)}

    def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model with its state."""
        index = []
        for name, model in self.models.items():
            state = "READY" if model.ready() else ("UNAVAILABLE" if self.fatal_error else "LOADING")
            entry = {"name": name, "version": "1", "state": state}
            if self.fatal_error:
                entry["reason"] = self.fatal_error
            index.append(entry)
        return index

    def render_metrics(self) -> bytes:
        texts = []
        for model in self.models.values():
            pool = model.pool
            workers = [(w.slot, w.pid, w.ready) for w in pool.workers]
            texts.append(model.metrics.render(len(model.batcher), workers, pool.gpu_memory(), pool.peak_memory(),
                                              running=pool.inflight_count()))
        return merge_expositions(texts)

    # --- inference --------------------------------------------------------------------------
    async def _inference(self, protocol: str, name: str, scope: Scope, receive: Receive, send: Send,
                         handle: Callable[[ServedModel, Scope, bytes],
                                          Awaitable[tuple[bytes, list[tuple[bytes, bytes]]]]]) -> None:
        """Read, decode, infer, encode; every outcome is counted and answered, none escapes."""
        started = time.perf_counter()
        status, headers = 200, _JSON_HEADERS
        model = self.models.get(name)
        client_gone = CLIENT_GONE.set(client_gone_probe(receive))
        try:
            if model is None:
                raise UnknownModel(name, self.names)
            payload, headers = await handle(model, scope, await self._read_body(scope, receive))
        except ServingError as exc:
            status, payload, headers = exc.status, error_body(str(exc)), _error_headers(exc)
        except ProtocolError as exc:
            status, payload = 400, error_body(str(exc))
        except BodyTooLarge:
            status, payload = 413, error_body(f"request body larger than {self.settings.max_body_mb:g} MB")
        finally:
            CLIENT_GONE.reset(client_gone)
        if model is not None:
            model.metrics.requests[(protocol, status)] += 1
            model.metrics.request_seconds.observe(time.perf_counter() - started)
        if self.leaving:
            headers = [*headers, (b"connection", b"close")]
        await respond(send, status, payload, headers=headers)

    async def _handle_v2(self, model: ServedModel, scope: Scope, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if model.passes_through:
            return await self._pass_through(model, scope, body, "v2", "predict")
        header_length: int | None = None
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                try:
                    header_length = int(value)
                except ValueError:
                    raise ProtocolError(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
        request = v2.decode_request(body, header_length)
        outputs = await self.infer(model, request.inputs, request.parameters)
        payload, json_length = v2.encode_response(model.name, request, outputs)
        if json_length is None:
            return payload, _JSON_HEADERS
        return payload, [(b"content-type", b"application/octet-stream"),
                         (b"inference-header-content-length", str(json_length).encode())]

    async def _handle_v1(self, model: ServedModel, scope: Scope, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if model.passes_through:
            return await self._pass_through(model, scope, body, "v1", "predict")
        inputs, parameters = v1.decode_request(body, (model.pool.metadata or {}).get("inputs", []))
        return v1.encode_response(await self.infer(model, inputs, parameters)), _JSON_HEADERS

    async def _handle_v1_explain(self, model: ServedModel, scope: Scope,
                                 body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if not model.passes_through:
            raise AnsweredError(404, f"model {model.name!r} has no explainer: :explain is served for format kserve "
                                     "models, whose class may define explain()")
        return await self._pass_through(model, scope, body, "v1", "explain")

    async def _pass_through(self, model: ServedModel, scope: Scope, body: bytes, protocol: str,
                            verb: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        call = kserve_passthrough.Call(protocol, verb, kserve_passthrough.headers_of(scope["headers"]), body)
        headers, payload = await self.pass_through(model, call)
        return payload, [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]

    async def pass_through(self, model: ServedModel, call: kserve_passthrough.Call) -> tuple[dict[str, str], bytes]:
        """One request to a KServe model, from either protocol: refused while draining."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        return await model.passthrough(call)

    def infer(self, model: ServedModel, inputs: list[NamedTensor],
              parameters: dict[str, Any] | None = None) -> Awaitable[list[NamedTensor]]:
        """One request to one model, from either protocol: refused while draining. A plain function
        returning the model's coroutine: one coroutine frame fewer to resume on the hot path."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        return model.infer(inputs, parameters)

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


EXTENSIONS = ("binary_tensor_data", "statistics", "model_repository", "parameters")


def _model_path(path: str) -> tuple[str, str | None]:
    """/v2/models/NAME[/versions/V][/VERB] -> (NAME, VERB): VERB "" for the model itself, None for a
    path that is not a model route. Any version is the one served."""
    parts = path[len("/v2/models/"):].split("/")
    rest = parts[1:]
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        rest = rest[2:]
    if not rest:
        return parts[0], ""
    if len(rest) == 1:
        return parts[0], rest[0]
    return parts[0], None


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _error_headers(exc: ServingError) -> list[tuple[bytes, bytes]]:
    if exc.retry_after is None:
        return _JSON_HEADERS
    return [(b"content-type", JSON), (b"retry-after", str(exc.retry_after).encode())]


def client_gone_probe(receive: Receive) -> Callable[[], bool] | None:
    """Whether this request's client has hung up, read from uvicorn's request cycle (``receive`` is its
    bound method; uvicorn sets ``disconnected`` when the connection is lost before the response).

    ASGI's own way to learn it is a task per request awaiting receive(): a cost on every request of the
    hot path, where this costs an attribute read when the queue asks. None under another server.
    """
    cycle: Any = getattr(receive, "__self__", None)
    if not isinstance(getattr(cycle, "disconnected", None), bool):
        return None
    return lambda: bool(cycle.disconnected)


async def respond(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    if headers is None:
        headers = [(b"content-type", content_type)]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
