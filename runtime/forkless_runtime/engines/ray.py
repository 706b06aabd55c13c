"""The Ray Serve engine: the same model, handler, codecs and settings as `forkless-runtime serve`, as one
Serve deployment (``engine: ray`` of an InferenceService renders a RayService that imports this module).

KubeRay's serveConfigV2 names ``forkless_runtime.engines.ray:build_app`` with ``args: {settings: {...}}``:
the runtime's own settings, by their field in its settings table (forkless_runtime.settings.FLAGS), parsed
by the runtime's own parser, so one contract configures both engines. The app builder runs wherever Serve
builds applications (a head with no GPU): it imports neither torch nor the model. Each replica loads the
model itself in ``__init__`` (Ray starts replicas as fresh processes: nothing is forked or pickled), with
the loaders of the spawned workers, and answers KServe V1 and Open Inference Protocol V2 over HTTP with the
codecs of the front-end. Batching is Serve's own ``@serve.batch``, counted in samples like the runtime's
batcher. Ray gives a fractional GPU as a logical share only; a replica with less than a whole GPU caps its
CUDA allocator at that share itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import orjson

from ..protocol import v1, v2
from ..protocol.tensors import NamedTensor, ProtocolError
from ..settings import (
    RAY_REPLICA_SETTINGS,
    Settings,
    add_flags,
    env_value,
    flag_name,
    resolve_model_directory,
    settings_from_args,
)

log = logging.getLogger("forkless.ray")

DEPLOYMENT_NAME = "ForklessModel"
REPLICA_SETTINGS = RAY_REPLICA_SETTINGS
JSON = "application/json"


class _Parser(argparse.ArgumentParser):
    """The runtime's flag parser, raising instead of exiting: a bad setting fails the Serve deploy with
    the runtime's own message (DEPLOY_FAILED in the RayService's status)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def parse_settings(values: Mapping[str, Any]) -> Settings:
    """Settings from {field: value}, through the same parsers as flags and FORKLESS_* variables."""
    unknown = sorted(set(values) - set(REPLICA_SETTINGS))
    if unknown:
        raise ValueError(f"settings not read by a Ray replica: {', '.join(unknown)}")
    parser = _Parser(prog="forkless_runtime.engines.ray")
    add_flags(parser)
    argv: list[str] = []
    for field, value in values.items():
        if value is not None:
            argv += [flag_name(field), env_value(value)]
    settings = settings_from_args(parser.parse_args(argv), parser)
    return resolve_model_directory(settings)


def batch_key(tensors: list[NamedTensor]) -> tuple[Any, ...] | None:
    """Requests with the same key can be concatenated along dimension 0 (as the runtime's batcher keys them)."""
    if any(t.array.ndim == 0 or t.array.dtype == object for t in tensors):
        return None
    return tuple((t.name, t.array.dtype.str, t.array.shape[1:]) for t in tensors)


def samples(tensors: list[NamedTensor]) -> int:
    first = tensors[0].array if tensors else None
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def split_outputs(outputs: list[NamedTensor], sizes: list[int]) -> list[list[NamedTensor]]:
    """The batch's outputs cut back into each request's rows."""
    bounds = np.cumsum(sizes)[:-1]
    parts = [np.split(tensor.array, bounds) for tensor in outputs]
    return [[NamedTensor(tensor.name, part[i]) for tensor, part in zip(outputs, parts, strict=True)]
            for i in range(len(sizes))]


def _response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    content = body if isinstance(body, bytes) else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, media_type=JSON, headers=headers)


def _error(status: int, message: str) -> Any:
    return _response({"error": message}, status)


class ForklessModel:
    """One Serve replica: the model loaded in this process, answering V1 and V2 over HTTP."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = parse_settings(settings)
        started = time.perf_counter()
        fmt = self.settings.resolved_format
        device = self.settings.device
        if device == "auto":
            device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "", "-1") else "cpu"
        threads = self.settings.threads_per_worker or max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1"))))
        if fmt in ("torchscript", "torch-export", "python"):
            try:
                import torch

                torch.set_num_threads(threads)
                if device == "cuda" and self.settings.gpu_memory_fraction is not None:
                    torch.cuda.set_per_process_memory_fraction(self.settings.gpu_memory_fraction, 0)
            except ImportError:
                if fmt != "python":
                    raise
        from ..worker.loaders import load_model

        self.model = load_model(fmt, self.settings.model_path, self.settings.handler, device, threads,
                                self.settings.precision, self.settings.signature, self.settings.model_name)
        self.name = self.settings.model_name
        self.meta = self.model.metadata()
        self._batcher.set_max_batch_size(self.settings.max_batch_size)
        self._batcher.set_batch_wait_timeout_s(self.settings.max_batch_delay_ms / 1000)
        log.info("loaded %s (%s, %s) on %s with %d thread(s) in %.2fs", self.settings.model_path or
                 self.settings.handler, fmt, self.settings.precision, device, threads, time.perf_counter() - started)

    # --- serving ---------------------------------------------------------------------------------

    async def predict(self, tensors: list[NamedTensor], parameters: dict[str, Any] | None) -> list[NamedTensor]:
        """Batched with other requests when the model allows it and no parameters ride along."""
        # A request bigger than a batch rides alone (Serve's batcher would refuse it), as in the runtime's batcher.
        if (self.model.batchable and parameters is None and self.settings.max_batch_size > 1
                and samples(tensors) <= self.settings.max_batch_size and batch_key(tensors)):
            result = await self._batcher(tensors)
            if isinstance(result, BaseException):  # Serve hands back what run_batch returned for this request
                raise result
            return list(result)
        return await asyncio.to_thread(self.model.predict, tensors, parameters)

    async def run_batch(self, requests: list[list[NamedTensor]]) -> list[list[NamedTensor] | BaseException]:
        """One Serve batch: requests grouped by what can be concatenated, each group one model call."""
        answers: list[list[NamedTensor] | BaseException] = [[] for _ in requests]
        groups: dict[Any, list[int]] = {}
        for i, tensors in enumerate(requests):
            groups.setdefault(batch_key(tensors), []).append(i)
        for members in groups.values():
            joined = [NamedTensor(t.name, np.concatenate([requests[i][n].array for i in members]))
                      for n, t in enumerate(requests[members[0]])]
            try:
                outputs = await asyncio.to_thread(self.model.predict, joined, None)
                for i, part in zip(members, split_outputs(outputs, [samples(requests[i]) for i in members]),
                                   strict=True):
                    answers[i] = part
            except Exception as exc:
                for i in members:
                    answers[i] = exc
        return answers

    @property
    def _batcher(self) -> Any:
        """run_batch as Serve's batcher wraps it (deployment()): called with one request's tensors."""
        return self.run_batch

    async def __call__(self, request: Any) -> Any:
        path = request.url.path.rstrip("/")
        try:
            if request.method == "GET":
                return self.get(path)
            if request.method == "POST":
                body = await request.body()
                if len(body) > self.settings.max_body_mb * 2**20:
                    return _error(413, f"the body is {len(body)} bytes; at most {self.settings.max_body_mb:g} MB")
                if path == f"/v2/models/{self.name}/infer" or path == f"/v2/models/{self.name}/versions/1/infer":
                    return await self.infer_v2(body, request.headers.get("inference-header-content-length"))
                if path == f"/v1/models/{self.name}:predict":
                    return await self.predict_v1(body)
            return self.unknown(path)
        except ProtocolError as exc:
            return _error(400, str(exc))
        except Exception as exc:
            return _error(500, f"{type(exc).__name__}: {exc}")

    def get(self, path: str) -> Any:
        if path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{self.name}/ready", f"/v1/models/{self.name}"):
            return _response({"live": True} if path.endswith("live") else {"name": self.name, "ready": True})
        if path == "/v2":
            return _response({"name": "forkless-runtime", "version": "ray", "extensions": []})
        if path in (f"/v2/models/{self.name}", f"/v2/models/{self.name}/versions/1"):
            return _response({"name": self.name, "versions": ["1"], "platform": self.meta["platform"],
                              "inputs": self.meta["inputs"], "outputs": self.meta["outputs"],
                              "parameters": {"engine": "ray", "precision": self.meta["precision"],
                                             "signature": self.meta["signature"]}})
        return self.unknown(path)

    def unknown(self, path: str) -> Any:
        if path.startswith(("/v2/models/", "/v1/models/")):
            model = path.split("/")[3].split(":")[0]
            return _error(404, f"Request for unknown model: '{model}' is not found; this server serves {self.name!r}")
        return _error(404, f"no route {path!r}: this server answers /v1/models/{self.name}:predict and "
                      f"/v2/models/{self.name}/infer")

    def check(self, inputs: list[NamedTensor]) -> None:
        from ..frontend.models import check_inputs

        check_inputs(inputs, self.meta)

    async def infer_v2(self, body: bytes, header_length: str | None) -> Any:
        try:
            length = int(header_length) if header_length is not None else None
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length must be a number, got {header_length!r}") from None
        request = v2.decode_request(body, length)
        self.check(request.inputs)
        outputs = await self.predict(request.inputs, request.parameters)
        content, json_length = v2.encode_response(self.name, request, outputs)
        headers = {"Inference-Header-Content-Length": str(json_length)} if json_length is not None else None
        return _response(content, headers=headers)

    async def predict_v1(self, body: bytes) -> Any:
        inputs, parameters = v1.decode_request(body, self.meta["inputs"])
        self.check(inputs)
        return _response(v1.encode_response(await self.predict(inputs, parameters)))


def deployment(max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, max_load_attempts: int = 3) -> Any:
    """ForklessModel as a Serve deployment, its batch method wrapped by Serve's batcher (counted in samples).

    A model that cannot load fails the deploy after ``max_load_attempts`` replica starts (the runtime's
    --max-load-attempts; Serve's own default is 20 tries, minutes of DEPLOYING before DEPLOY_FAILED)."""
    from ray import serve

    # Serve recognises a method by finding the wrapper under the wrapped function's own name.
    run_batch = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                            batch_size_fn=lambda items: sum(samples(t) for t in items))(ForklessModel.run_batch)
    replica = type(DEPLOYMENT_NAME, (ForklessModel,), {"run_batch": run_batch, "__module__": __name__})
    return serve.deployment(name=DEPLOYMENT_NAME, max_constructor_retry_count=max_load_attempts)(replica)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (serveConfigV2 ``import_path``); ``args`` is ``{settings: {...}}``.

    The settings are checked here, where Serve builds the app, so that a wrong one fails the deploy with
    its reason before any replica starts; the model is not touched."""
    settings = args.get("settings")
    if not isinstance(settings, dict):
        raise ValueError("args.settings must be a mapping of forkless-runtime settings")
    attempts = parse_settings(settings).max_load_attempts  # unknown or malformed settings fail here
    return deployment(max_load_attempts=attempts).bind(settings)


__all__ = ["DEPLOYMENT_NAME", "REPLICA_SETTINGS", "ForklessModel", "build_app", "parse_settings"]
