"""Open Inference Protocol (KServe V2) REST codec, with the binary tensor data extension.

Pure functions: bytes in, tensors out, and back. A body is JSON unless the request carries
`Inference-Header-Content-Length`, whatever its content type (tritonclient's JSON mode sends none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .tensors import (
    NamedTensor,
    ProtocolError,
    dtype_of,
    element_count,
    pack_bytes,
    unpack_bytes,
)

HEADER_LENGTH = "inference-header-content-length"
_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None


# Parameters the protocol itself defines: they steer the codec and never reach a handler.
RESERVED_PARAMETERS = frozenset({"binary_data_output", "binary_data_size", "binary_data", "classification",
                                 "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"})


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[NamedTensor]
    outputs: list[RequestedOutput] | None
    binary_output: bool
    parameters: dict[str, Any] | None = None  # {"request": {...}, "inputs": {name: {...}}}, None when none sent


def handler_parameters(request_level: Any, by_input: dict[str, Any]) -> dict[str, Any] | None:
    """The parameters a handler sees: the request's and each input's, less the protocol's own."""
    request = {k: v for k, v in request_level.items() if k not in RESERVED_PARAMETERS} if isinstance(
        request_level, dict) else {}
    inputs = {name: {k: v for k, v in params.items() if k not in RESERVED_PARAMETERS}
              for name, params in by_input.items() if isinstance(params, dict)}
    inputs = {name: params for name, params in inputs.items() if params}
    if not request and not inputs:
        return None
    return {"request": request, "inputs": inputs}


def parse_json(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _flatten_strings(data: Any) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, bytes):
            out.append(item)
        else:
            raise ProtocolError(f"BYTES data must be strings, got {type(item).__name__}")
    return out


def decode_json_tensor(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    count = element_count(shape)
    if datatype == "BYTES":
        items = _flatten_strings(data)
        if len(items) != count:
            raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(items)}")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = dtype_of(datatype)
    try:
        array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: data is not valid {datatype}: {exc}") from None
    # JSON has no NaN literal: a NaN here came from a null or a string ("nan"), which numpy converts
    # silently; the model would answer NaNs (sent back as nulls) for what is the client's mistake.
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise ProtocolError(f"input {name!r}: data is not valid {datatype}: null or a non-number string among the numbers")
    if array.size != count:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} elements, got {array.size}")
    return array.reshape(shape)


def decode_binary_tensor(name: str, datatype: str, shape: tuple[int, ...], blob: memoryview) -> np.ndarray:
    count = element_count(shape)
    if datatype == "BYTES":
        return unpack_bytes(blob, count, shape)
    dtype = dtype_of(datatype)
    expected = count * dtype.itemsize
    if len(blob) != expected:
        raise ProtocolError(
            f"input {name!r}: binary_data_size is {len(blob)} bytes but shape {list(shape)} of {datatype} "
            f"needs {expected}"
        )
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an infer request body; raise ProtocolError naming what is wrong."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
            )
        header = parse_json(memoryview(body)[:header_length])
        binary = memoryview(body)[header_length:]
    else:
        header = parse_json(body)
        binary = memoryview(b"")
    if not isinstance(header, dict):
        raise ProtocolError("the request body must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")

    inputs: list[NamedTensor] = []
    tensor_parameters: dict[str, Any] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise ProtocolError(f"inputs[{index}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"inputs[{index}] needs a 'name'")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"input {name!r} needs a 'datatype'")
        shape = _shape(raw.get("shape"), name)
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be an object of name: value")
        if params:
            tensor_parameters[name] = params
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise ProtocolError(
                    f"input {name!r}: binary_data_size {size} runs past the {len(binary)} binary bytes sent"
                )
            array = decode_binary_tensor(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in raw:
            array = decode_json_tensor(name, datatype, shape, raw["data"])
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        inputs.append(NamedTensor(name, array))
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} binary bytes follow the header that no input claims")

    params = header.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object of name: value")
    binary_output = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outputs: list[RequestedOutput] | None = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise ProtocolError("each requested output needs a 'name'")
            out_params = raw.get("parameters")
            flag = out_params.get("binary_data") if isinstance(out_params, dict) else None
            outputs.append(RequestedOutput(raw["name"], None if flag is None else bool(flag)))
    request_id = header.get("id")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        outputs=outputs,
        binary_output=binary_output,
        parameters=handler_parameters(params, tensor_parameters),
    )


def _json_data(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.dtype == object:
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in flat]
    if not flat.flags.c_contiguous or not flat.dtype.isnative:
        flat = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))
    return flat


def select_outputs(
    request: InferRequest, outputs: list[NamedTensor]
) -> list[tuple[NamedTensor, bool]]:
    """The outputs to return and whether each goes binary; an unknown requested name is a 400."""
    if request.outputs is None:
        return [(tensor, request.binary_output) for tensor in outputs]
    by_name = {tensor.name: tensor for tensor in outputs}
    chosen: list[tuple[NamedTensor, bool]] = []
    for wanted in request.outputs:
        tensor = by_name.get(wanted.name)
        if tensor is None:
            raise ProtocolError(
                f"unknown output {wanted.name!r}; the model returns {', '.join(by_name) or 'nothing'}"
            )
        chosen.append((tensor, request.binary_output if wanted.binary is None else wanted.binary))
    return chosen


def encode_response(
    model_name: str, request: InferRequest, outputs: list[NamedTensor], model_version: str = "1"
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor, binary in select_outputs(request, outputs):
        array = tensor.array
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
        if binary:
            blob = pack_bytes(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    header = orjson.dumps(body, option=_NUMPY_JSON)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
