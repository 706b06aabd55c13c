"""KServe V1 protocol codec: `{"instances": [...]}` (or `{"inputs": ...}`) -> `{"predictions": [...]}`."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from .tensors import NamedTensor, ProtocolError, dtype_of
from .v2 import handler_parameters, parse_json


def decode_request(body: bytes, declared: list[dict[str, Any]]) -> tuple[list[NamedTensor], dict[str, Any] | None]:
    """V1 instances become one batched tensor of the model's input datatype (FP32 when unknown); a
    `parameters` object beside them reaches a handler that asks for parameters.

    JSON has no float/int distinction a client controls (`[1, 2]` parses as integers), and most
    models take FP32, so numbers become FP32 unless the model's metadata names another type.
    """
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ProtocolError("the request body must be a JSON object with 'instances' or 'inputs'")
    instances = payload.get("instances", payload.get("inputs"))
    if not isinstance(instances, list) or not instances:
        raise ProtocolError("'instances' (or 'inputs') must be a non-empty list")
    try:
        array = np.array(instances)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"instances must form a rectangular array: {exc}") from None
    spec = declared[0] if declared else {}
    if array.dtype.kind in "fiub":
        datatype = spec.get("datatype") or ("BOOL" if array.dtype.kind == "b" else "FP32")
        try:
            array = array.astype(dtype_of(datatype))
        except (ValueError, OverflowError) as exc:
            raise ProtocolError(f"instances are not valid {datatype}: {exc}") from None
    elif array.dtype.kind == "U":
        flat = np.empty(array.size, dtype=object)
        flat[:] = [item.encode() for item in array.reshape(-1)]
        array = flat.reshape(array.shape)
    else:
        raise ProtocolError("instances must be numbers, booleans or strings, all of the same shape")
    parameters = payload.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object of name: value")
    return [NamedTensor(spec.get("name", "input-0"), array)], handler_parameters(parameters, {})


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [[*map(_decode, row)] if isinstance(row, np.ndarray) else _decode(row) for row in array]
    return array


def _decode(item: Any) -> Any:
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else item


def encode_response(outputs: list[NamedTensor]) -> bytes:
    if len(outputs) == 1:
        predictions: Any = _jsonable(outputs[0].array)
    else:
        rows = len(outputs[0].array) if outputs[0].array.ndim else 1
        predictions = [{t.name: _jsonable(t.array[i]) for t in outputs} for i in range(rows)]
    return orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)
