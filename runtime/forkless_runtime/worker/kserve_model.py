"""`--format kserve`: an unmodified `kserve.Model` subclass, one instance per spawned worker.

KServe's own server loads the model in its parent process and, with `--workers 2`, forks it or
pickles it into its children (TorchScript then fails at start-up). Here every worker imports the
user's module and constructs the model itself, after its GPU and thread budget are set.

Requests reach the worker as KServe would see them: the raw body, the request headers (lower-case,
the last of repeated names, as Starlette's `dict(request.headers)`), the protocol and the verb.
KServe's own `DataPlane` then decodes, calls the model (`preprocess` -> `predict`/`explain` ->
`postprocess`, sync or async) and encodes, exactly as KServe 0.21's V1, V2 and gRPC endpoints
do; the answer goes back as the body, the status and the response headers. KServe's exception
types keep their status codes. This module needs the `kserve` package, which the user's image adds.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from typing import Any

import orjson

from ..protocol.kserve_passthrough import decode_call, encode_reply
from ..protocol.tensors import NamedTensor
from .loaders import LoadedModel, import_class

# Starlette answers without these; KServe's explain echoes the request's headers, and these would be wrong.
_HOP_BY_HOP = frozenset({"content-length", "host", "connection", "transfer-encoding", "keep-alive", "expect",
                         "te", "upgrade", "accept-encoding"})


def kserve_argv(name: str, model_dir: str | None) -> list[str]:
    """The command line KServe gives a custom predictor's container: modules that parse it at import
    (`parser.parse_known_args()` with KServe's parent parser) see the model's name and directory."""
    argv = [sys.argv[0] if sys.argv and sys.argv[0] else "kserve-predictor", f"--model_name={name}"]
    if model_dir:
        argv.append(f"--model_dir={model_dir}")
    return argv


def load_kserve(handler: str, model_path: str, name: str) -> LoadedModel:
    model_dir = model_path if os.path.isdir(model_path) else (os.path.dirname(model_path) if model_path else None)
    sys.argv = kserve_argv(name, model_dir)
    try:
        import kserve
        from kserve.model_repository import ModelRepository
        from kserve.protocol.dataplane import DataPlane
    except ImportError as exc:
        raise ImportError(f"format kserve needs the kserve package in the image ({exc}); install it on top of the "
                          "runtime image, e.g. pip install kserve==0.21.0") from exc
    cls = import_class(handler)
    if not issubclass(cls, kserve.Model):
        raise ValueError(f"handler {handler!r} must name a kserve.Model subclass for format kserve "
                         "(use format python for a plain handler class)")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        instance = cls(name)
    except TypeError as exc:
        raise TypeError(f"{handler}({name!r}) failed: {exc}; forkless constructs a KServe model with its name "
                        "only, as KServe's samples do") from exc
    if not instance.ready:
        result = instance.load()
        if inspect.isawaitable(result):
            loop.run_until_complete(result)
    if not instance.ready:
        raise ValueError(f"{handler}: load() returned but the model is not ready; set self.ready = True in load(), "
                         "as KServe's readiness also requires")
    repository = ModelRepository()
    repository.update(instance, name)
    adapter = KServeAdapter(DataPlane(repository), instance, name, loop)
    model = LoadedModel("kserve", adapter.predict, batchable=False, signature="declared")
    model.notes.append(f"kserve {_version('kserve')}: {handler} answers through KServe's own data plane, "
                       "one request at a time per worker")
    return model


class KServeAdapter:
    """One request at a time, through KServe's DataPlane, on the worker's own event loop."""

    def __init__(self, dataplane: Any, model: Any, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dataplane = dataplane
        self.model = model
        self.name = name
        self.loop = loop

    def predict(self, tensors: list[NamedTensor], parameters: dict[str, Any] | None = None) -> list[NamedTensor]:
        call = decode_call(tensors, parameters)
        status, headers, body = self.loop.run_until_complete(self.answer(call.protocol, call.verb, call.headers,
                                                                         call.body))
        return encode_reply(status, headers, body)

    async def answer(self, protocol: str, verb: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            if not self.model.ready:
                from kserve.errors import ModelNotReady

                raise ModelNotReady(self.name)
            if protocol == "v1":
                return await self._v1(verb, headers, body)
            if protocol == "v2":
                return await self._v2(headers, body)
            if protocol == "grpc":
                return await self._grpc(headers, body)
            raise NotImplementedError(f"protocol {protocol!r}")
        except Exception as exc:  # KServe's exception handlers, one by one (kserve/errors.py)
            return _error_reply(exc)

    async def _v1(self, verb: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """kserve/protocol/rest/v1_endpoints.py: predict and explain."""
        dataplane = self.dataplane
        request, attributes = dataplane.decode(body=body, headers=headers)
        if verb == "explain":
            response, response_headers = await dataplane.explain(self.name, request, headers)
            response, encoded = dataplane.encode(self.name, response, response_headers, attributes)
        else:
            response, response_headers = await dataplane.infer(model_name=self.name, request=request,
                                                               headers=headers)
            response, encoded = dataplane.encode(self.name, response, headers, attributes)
        response_headers = {k: v for k, v in {**response_headers, **encoded}.items() if k not in _HOP_BY_HOP}
        if isinstance(response, str):
            response = response.encode()
        if isinstance(response, bytes):
            return 200, response_headers, response
        response_headers.setdefault("content-type", "application/json")
        return 200, response_headers, orjson.dumps(response, option=orjson.OPT_NON_STR_KEYS
                                                    | orjson.OPT_SERIALIZE_NUMPY)

    async def _v2(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """kserve/protocol/rest/v2_endpoints.py: infer. FastAPI parses a JSON body into InferenceRequest
        and leaves a binary one (Inference-Header-Content-Length) as bytes."""
        from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse

        request: Any = body
        if "inference-header-content-length" not in headers:
            request = _parse(InferenceRequest, body)
        dataplane = self.dataplane
        infer_request, _ = dataplane.decode(request, headers, protocol_version="v2", model_name=self.name)
        response, response_headers = await dataplane.infer(model_name=self.name, request=infer_request,
                                                           headers=headers)
        response, encoded = dataplane.encode(self.name, response, headers, {})
        response_headers = {k: v for k, v in {**response_headers, **encoded}.items()
                            if k not in _HOP_BY_HOP and k != "content-type"}
        if isinstance(response, bytes):
            response_headers["content-type"] = "application/octet-stream"
            return 200, response_headers, response
        document = InferenceResponse.model_validate(response).model_dump(mode="json", by_alias=True)
        response_headers["content-type"] = "application/json"
        return 200, response_headers, orjson.dumps(document)

    async def _grpc(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """kserve/protocol/grpc/servicer.py: ModelInfer, with KServe's own messages (same field numbers
        as the front-end's, so the bytes pass unchanged)."""
        from kserve.errors import InvalidInput
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.infer_type import InferRequest, InferResponse

        request = pb.ModelInferRequest.FromString(body)
        raw = len(request.raw_input_contents)
        if raw and len(request.inputs) != raw:
            raise InvalidInput(f"the number of inputs ({len(request.inputs)}) does not match the expected number "
                               f"of raw input contents ({raw}) for model '{request.model_name}'.")
        response, _ = await self.dataplane.infer(request=InferRequest.from_grpc(request), headers=headers,
                                                 model_name=self.name)
        if isinstance(response, InferResponse):
            response = response.to_grpc()
        elif not isinstance(response, pb.ModelInferResponse):
            response = pb.ModelInferResponse(id=response["id"], model_name=response["model_name"],
                                             outputs=response["outputs"])
        return 200, {"content-type": "application/grpc"}, response.SerializeToString()


def _parse(model: Any, body: bytes) -> Any:
    """A JSON body into KServe's pydantic request; FastAPI would answer 422 with the errors."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise _Unprocessable(f"invalid inference request: {problems}") from None


class _Unprocessable(Exception):
    pass


def _error_reply(exc: Exception) -> tuple[int, dict[str, str], bytes]:
    """The status and body KServe's exception handlers give each of its errors."""
    from kserve import errors

    statuses: list[tuple[type[BaseException], int]] = [
        (errors.InvalidInput, 400), (errors.InferenceError, 500), (errors.ModelNotFound, 404),
        (errors.ModelNotReady, 503), (NotImplementedError, 501), (errors.UnsupportedProtocol, 501),
        (errors.ServerNotLive, 503), (errors.ServerNotReady, 503), (_Unprocessable, 422),
    ]
    for kind, status in statuses:
        if isinstance(exc, kind):
            return status, {"content-type": "application/json"}, orjson.dumps({"error": str(exc)})
    return 500, {"content-type": "application/json"}, orjson.dumps({"error": f"{type(exc).__name__} : {exc}"})


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"

