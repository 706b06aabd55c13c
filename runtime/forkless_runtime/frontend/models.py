"""The models one front-end serves: which they are (from --model-name, repeated --model and a model
repository), and each one's own batcher, worker pool, metrics and statistics.

Every model gets the server's settings with its own name, file, format, handler and signature, so
one server's flags (workers, batching, timeouts) apply to each model alike; the pools divide the
CPUs and each GPU's memory between the models. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import orjson

from ..batching.batcher import Batcher, Request
from ..errors import AnsweredError, NotReady, RequestTimeout, ServingError
from ..pool.supervisor import WorkerPool
from ..protocol import kserve_passthrough, signature
from ..protocol.tensors import NamedTensor, ProtocolError
from ..settings import HANDLER_PATTERN, Settings, resolve_model_directory
from .metrics import Metrics

# Whether the client of the request this task serves has hung up, where the transport can tell: set by
# the HTTP front-end around each request (a context variable rather than a parameter of every codec
# and handler in between). The queue drops such a request when it reaches the head (batcher.dropped).
CLIENT_GONE: ContextVar[Callable[[], bool] | None] = ContextVar("client_gone", default=None)


class ModelSetError(ValueError):
    """The models named cannot be served together (a duplicate name, an unreadable repository)."""


def served_settings(settings: Settings) -> list[Settings]:
    """One Settings per model: --model-name's model first, then each --model, then the repository's."""
    single = {"models": (), "model_repository": None}
    found: list[Settings] = []
    if settings.model_name:
        found.append(_with_config_beside(resolve_model_directory(settings.replace(**single))))
    for entry in settings.models:
        name, _, uri = entry.partition("=")
        if re.fullmatch(HANDLER_PATTERN, uri):
            model = settings.replace(**single, model_name=name, model_uri="", handler=uri, format="python",
                                     signature=None)
        else:
            model = settings.replace(**single, model_name=name, model_uri=uri, handler=None, format=None,
                                     signature=None)
            model = _with_config_beside(resolve_model_directory(model))
        found.append(model)
    if settings.model_repository:
        found += repository_models(settings.replace(**single), settings.model_repository)
    names = [model.model_name for model in found]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ModelSetError(f"model name(s) {', '.join(duplicates)} given more than once; each model needs its own")
    for model in found:
        model.resolved_format  # noqa: B018 - a model whose format cannot be told fails here, with the reason
    return found


def _with_config_beside(model: Settings) -> Settings:
    """A model file in a repository layout takes its signature from the config.pbtxt beside it."""
    if model.signature or model.handler or not model.model_path or not os.path.isfile(model.model_path):
        return model
    root = os.path.dirname(os.path.dirname(os.path.abspath(model.model_path)))
    config = signature.config_beside(model.model_path, root)
    return model.replace(signature=config) if config else model


def repository_models(base: Settings, root: str) -> list[Settings]:
    """Triton's layout: ``root/<name>/config.pbtxt`` and ``root/<name>/<version>/model.<ext>``. A
    config whose backend is python names its handler in ``parameters { key: "handler" ... }``."""
    if not os.path.isdir(root):
        raise ModelSetError(f"model repository {root} is not a directory")
    models: list[Settings] = []
    for name in sorted(os.listdir(root)):
        directory = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(directory):
            continue
        config_path = os.path.join(directory, signature.CONFIG_FILE)
        config = signature.read_config(config_path) if os.path.isfile(config_path) else {}
        handler = _config_parameter(config, "handler")
        model = base.replace(model_name=str(config.get("name") or name),
                             signature=config_path if "input" in config else None)
        if config.get("backend") == "python" or handler:
            if not handler or not re.fullmatch(HANDLER_PATTERN, handler):
                raise ModelSetError(f"{config_path}: a python backend model needs parameters {{ key: \"handler\" "
                                    "value: { string_value: \"package.module:Class\" } }")
            model = model.replace(handler=handler, format="python", model_uri=directory)
        else:
            fmt = signature.TRITON_PLATFORMS.get(str(config.get("platform", "")))
            model = resolve_model_directory(model.replace(model_uri=directory, handler=None, format=fmt))
        models.append(model)
    if not models:
        raise ModelSetError(f"model repository {root} holds no model directory")
    return models


def _config_parameter(config: dict[str, Any], key: str) -> str | None:
    entries = config.get("parameters", [])
    for entry in entries if isinstance(entries, list) else [entries]:
        if isinstance(entry, dict) and entry.get("key") == key:
            value = entry.get("value", {})
            return str(value.get("string_value")) if isinstance(value, dict) else None
    return None


class ServedModel:
    """One model behind the front-end: its batcher, its worker pool, its metrics and statistics."""

    def __init__(self, settings: Settings, on_fatal: Callable[[str], None], models_sharing: int = 1) -> None:
        self.name = settings.model_name
        self.settings = settings
        self.metrics = Metrics(settings.model_name)
        self.batcher = Batcher(settings.max_batch_size, settings.max_batch_delay_ms / 1000, settings.max_queue)
        self.pool = WorkerPool(settings, self.batcher, self.metrics, on_fatal, models_sharing)
        self.fatal_error: str | None = None
        # KServe's model classes take KServe's payloads: requests pass through undecoded.
        self.passes_through = settings.resolved_format == "kserve"

    def ready(self) -> bool:
        return self.pool.ready_count() > 0

    def metadata(self) -> dict[str, Any]:
        """V2 model metadata; parameters say how it is served."""
        meta = self.pool.metadata or {}
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": meta.get("platform", self.settings.resolved_format),
            "inputs": meta.get("inputs", []),
            "outputs": meta.get("outputs", []),
            "parameters": {"batchable": bool(meta.get("batchable")), "max_batch_size": self.settings.max_batch_size,
                           "workers": len(self.pool.workers), "workers_auto": self.pool.auto_decision,
                           "precision": meta.get("precision", self.settings.precision),
                           "signature": meta.get("signature", ""),
                           "warm_up": meta.get("warm_up", {}), "notes": meta.get("notes", [])},
        }

    async def infer(self, inputs: list[NamedTensor], parameters: dict[str, Any] | None = None) -> list[NamedTensor]:
        """Check the inputs against the signature, queue them for the batcher and wait for this
        request's slice of the outputs; counted in the statistics either way."""
        started = time.perf_counter()
        try:
            outputs = await self._enqueue(inputs, parameters)
        except (ServingError, ProtocolError):
            self.metrics.stats.request_done(False, time.perf_counter() - started)
            raise
        self.metrics.stats.request_done(True, time.perf_counter() - started)
        return outputs

    async def passthrough(self, call: kserve_passthrough.Call) -> tuple[dict[str, str], bytes]:
        """A request a KServe model decodes itself, through the same queue, workers and limits; its error
        statuses (KServe's exception handlers) come back as AnsweredError."""
        started = time.perf_counter()
        try:
            inputs, parameters = kserve_passthrough.encode_call(call)
            status, headers, body = kserve_passthrough.decode_reply(await self._enqueue(inputs, parameters))
            if status >= 400:
                raise AnsweredError(status, _error_text(body))
        except (ServingError, ProtocolError):
            self.metrics.stats.request_done(False, time.perf_counter() - started)
            raise
        self.metrics.stats.request_done(True, time.perf_counter() - started)
        return headers, body

    def _enqueue(self, inputs: list[NamedTensor], parameters: dict[str, Any] | None) -> asyncio.Future:
        """Queue a request and return the future its outputs arrive on (a plain function, not a
        coroutine: the caller awaits the future itself, one frame fewer per request)."""
        meta = self.pool.metadata
        if meta is None:
            raise NotReady(f"model {self.name!r} is still loading" if self.fatal_error is None else self.fatal_error)
        check_inputs(inputs, meta)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS) if parameters else b""
        request = Request(inputs, future, meta.get("batchable", False) and self.settings.max_batch_size > 1,
                          parameters=parameters, parameters_key=key, client_gone=CLIENT_GONE.get())
        timeout = self.settings.request_timeout_s
        if timeout > 0:
            request.deadline = time.time() + timeout
            request.timer = loop.call_later(timeout, _expire, future, timeout)
        try:
            self.pool.submit(request)
        except ServingError:
            if request.timer is not None:
                request.timer.cancel()
            raise
        return future


def _error_text(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body.decode("utf-8", "replace")


def _expire(future: asyncio.Future, timeout: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(f"no answer within the request timeout of {timeout:g} s"))


def check_inputs(inputs: list[NamedTensor], meta: dict[str, Any]) -> None:
    """Reject what the signature says the model cannot take: a 400 naming the tensor, before it is queued.
    An assumed signature (TorchScript without one) is not enforced beyond numbers for PyTorch."""
    if meta.get("platform", "").startswith("pytorch"):
        for tensor in inputs:
            if tensor.array.dtype == object:
                raise ProtocolError(f"input {tensor.name!r}: a PyTorch model takes numeric tensors, not BYTES")
    declared = meta.get("inputs") or []
    if not declared:
        return
    if meta.get("signature") == "assumed":
        if len(inputs) != len(declared):
            names = ", ".join(spec["name"] for spec in declared)
            raise ProtocolError(f"the model takes {len(declared)} input(s) ({names}), got {len(inputs)}")
        return
    signature.check_request([(t.name, t.datatype, t.array.shape) for t in inputs], declared)

