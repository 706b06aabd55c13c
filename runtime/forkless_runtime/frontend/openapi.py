"""The front-end's HTTP API as an OpenAPI 3.0 document, served at GET /openapi.json.

Written by hand next to the routes in app.py rather than derived from them: the raw ASGI app has
no framework to introspect, and the document is the contract the fuzzer (schemathesis) holds the
server to. Every route, the request and response bodies of both protocols, and every error a
route can answer are here; a route added to app.py without an entry here is a bug the
reliability tests report. Pure data, no I/O; the served model's name and, once a worker has
loaded it, its input metadata make the examples concrete.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..protocol.tensors import DATATYPE_TO_DTYPE

DATATYPES = list(DATATYPE_TO_DTYPE)

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong, in words"}},
}

_ERRORS: dict[str, tuple[str, bool]] = {  # status -> (when, carries Retry-After)
    "400": ("The request is malformed: bad JSON, or a shape, datatype or element count the model cannot take.",
            False),
    "404": ("No such route, or a model this server does not serve.", False),
    "405": ("A method other than GET, HEAD or POST.", False),
    "413": ("The body is larger than --max-body-mb.", False),
    "500": ("The model raised on this request; the message is the model's. The worker keeps serving.", False),
    "503": ("Not ready, shutting down, queue full (--max-queue) or the request's worker died twice: retry "
            "after Retry-After seconds, here or on another replica.", True),
    "504": ("No answer within --request-timeout-s.", False),
}


def _error_response(status: str) -> dict[str, Any]:
    description, retry_after = _ERRORS[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": {
            "description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}}
    return response


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: _error_response(status) for status in statuses}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_TENSOR_DATA = {
    "description": "The tensor's elements in row-major order, flat or nested; strings for BYTES.",
    "type": "array",
    "items": {},
}

_SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}},
    },
    "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {"type": "object", "required": ["name", "ready"],
                   "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "description": "empty when the format does not say (TorchScript)"},
            "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1 for a dynamic dimension"},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            "parameters": {"type": "object"},
        },
    },
    "InferInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": DATATYPES},
            "parameters": {"type": "object", "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0,
                                     "description": "bytes of this tensor after the JSON header (binary extension)"}}},
            "data": _TENSOR_DATA,
        },
    },
    "InferRequestedOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"},
                       "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}},
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "items": _ref("InferInput")},
            "outputs": {"type": "array", "items": _ref("InferRequestedOutput")},
        },
    },
    "InferOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": DATATYPES},
            "parameters": {"type": "object"},
            "data": _TENSOR_DATA,
        },
    },
    "InferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("InferOutput")},
        },
    },
    "V1Request": {
        "description": "KServe V1: a non-empty list of instances (or 'inputs'), all of one shape.",
        "type": "object",
        "properties": {
            "instances": {"type": "array", "minItems": 1, "items": {}},
            "inputs": {"type": "array", "minItems": 1, "items": {}},
        },
    },
    "V1Response": {"type": "object", "required": ["predictions"],
                   "properties": {"predictions": {"type": "array", "items": {}}}},
    "V1ModelStatus": {"type": "object", "required": ["name", "ready"],
                      "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
}


def _example_input(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request the served model takes, when its metadata says enough (one input, known trailing dims)."""
    inputs = (metadata or {}).get("inputs") or []
    if len(inputs) != 1 or not inputs[0].get("datatype") or inputs[0]["datatype"] == "BYTES":
        return None
    shape = [1 if d == -1 else d for d in inputs[0]["shape"]]
    count = 1
    for dim in shape:
        count *= dim
    if count > 4096:
        return None
    value: Any = False if inputs[0]["datatype"] == "BOOL" else 0
    return {"inputs": [{"name": inputs[0]["name"], "shape": shape, "datatype": inputs[0]["datatype"],
                        "data": [value] * count}]}


def document(model_names: list[str], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.0 document of this server, serving `model_names` (examples from the first's metadata)."""
    name_param = {"name": "name", "in": "path", "required": True,
                  "description": "the served model's name", "schema": {"type": "string", "enum": model_names}}
    version_param = {"name": "version", "in": "path", "required": True,
                     "description": "any version: one version is served", "schema": {"type": "string", "pattern": "^[^/]+$"}}
    example = _example_input(metadata)
    infer_body: dict[str, Any] = {"schema": _ref("InferRequest")}
    if example is not None:
        infer_body["example"] = example
    infer_request = {
        "required": True,
        "description": "JSON, whatever the Content-Type; with Inference-Header-Content-Length the first that many "
                       "bytes are the JSON header and binary tensor data follows (binary_data_size per input).",
        "content": {"application/json": infer_body},
    }
    header_param = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "description": "length of the JSON header when binary tensor data follows it",
                    "schema": {"type": "integer", "minimum": 0}}

    def infer(params: list[dict[str, Any]]) -> dict[str, Any]:
        return {"post": {
            "summary": "Run inference (Open Inference Protocol V2)",
            "parameters": [*params, header_param],
            "requestBody": infer_request,
            "responses": {"200": {"description": "the outputs", "content": _json(_ref("InferResponse"))},
                          **_errors("400", "404", "413", "500", "503", "504")},
        }}

    def model_ready(params: list[dict[str, Any]]) -> dict[str, Any]:
        return {"get": {"summary": "Whether the model can take requests", "parameters": params, "responses": {
            "200": {"description": "ready", "content": _json(_ref("ModelReady"))},
            "503": {"description": "not ready (loading, no worker alive, or shutting down)",
                    "content": _json(_ref("ModelReady"))},
            **_errors("404")}}}

    def model_metadata(params: list[dict[str, Any]]) -> dict[str, Any]:
        return {"get": {"summary": "Names, datatypes and shapes of the model's inputs and outputs",
                        "parameters": params, "responses": {
                            "200": {"description": "metadata", "content": _json(_ref("ModelMetadata"))},
                            **_errors("404")}}}

    versioned = [name_param, version_param]
    return {
        "openapi": "3.0.3",
        "info": {"title": "forkless-runtime", "version": __version__,
                 "description": f"KServe V1 and Open Inference Protocol V2 for the model(s) {', '.join(model_names)}."},
        "paths": {
            "/v2": {"get": {"summary": "Server metadata", "responses": {
                "200": {"description": "server metadata", "content": _json(_ref("ServerMetadata"))}}}},
            "/v2/health/live": {"get": {"summary": "Liveness", "responses": {
                "200": {"description": "the process serves HTTP", "content": _json(_ref("Live"))}}}},
            "/v2/health/ready": {"get": {"summary": "Readiness: at least one worker has the model loaded", "responses": {
                "200": {"description": "ready", "content": _json(_ref("Ready"))},
                "503": {"description": "not ready", "content": _json(_ref("Ready"))}}}},
            "/v2/models/{name}": model_metadata([name_param]),
            "/v2/models/{name}/versions/{version}": model_metadata(versioned),
            "/v2/models/{name}/ready": model_ready([name_param]),
            "/v2/models/{name}/versions/{version}/ready": model_ready(versioned),
            "/v2/models/{name}/infer": infer([name_param]),
            "/v2/models/{name}/versions/{version}/infer": infer(versioned),
            "/v1/models/{name}": {"get": {"summary": "KServe V1 model status", "parameters": [name_param], "responses": {
                "200": {"description": "status", "content": _json(_ref("V1ModelStatus"))}, **_errors("404")}}},
            "/v1/models/{name}:predict": {"post": {
                "summary": "KServe V1 prediction: numbers become the model's input datatype (FP32 when unknown)",
                "parameters": [name_param],
                "requestBody": {"required": True, "content": _json(_ref("V1Request"))},
                "responses": {"200": {"description": "predictions", "content": _json(_ref("V1Response"))},
                              **_errors("400", "404", "413", "500", "503", "504")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the whole pod", "responses": {
                "200": {"description": "text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.0", "content": _json({"type": "object"})}}}},
        },
        # Every error answer, 405 included (a method other than GET, HEAD or POST on any path).
        "components": {"schemas": _SCHEMAS, "responses": {f"Error{status}": _error_response(status) for status in _ERRORS}},
    }
