"""Open Inference Protocol over gRPC: ModelInferRequest -> tensors and parameters, tensors ->
ModelInferResponse. Pure functions, no I/O; the server is frontend/grpc_server.py.

Inputs come as `raw_input_contents` (one blob per input, what tritonclient and KServe's client send)
or as typed `contents`; outputs always go back raw, which every client reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import grpc_service_pb2 as pb
from .tensors import NamedTensor, ProtocolError, dtype_of, element_count, pack_bytes
from .v2 import InferRequest, RequestedOutput, decode_binary_tensor, handler_parameters, select_outputs

# The typed field of InferTensorContents that carries each datatype (FP16 travels raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters_of(field: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in field.items()}


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in raw)
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {list(shape)} must be non-negative sizes")
    return shape


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        dtype_of(datatype)  # an unknown datatype names itself
        raise ProtocolError(f"input {name!r}: {datatype} travels only in raw_input_contents")
    values = list(getattr(contents, field))
    count = element_count(shape)
    if len(values) != count:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(values)} "
                            f"in contents.{field}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype_of(datatype)).reshape(shape)
    except OverflowError as exc:
        raise ProtocolError(f"input {name!r}: a value does not fit {datatype}: {exc}") from None


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    """Tensors and parameters of a ModelInferRequest; ProtocolError names what is wrong."""
    if not request.inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                            "one per input, in order")
    inputs: list[NamedTensor] = []
    tensor_parameters: dict[str, Any] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise ProtocolError(f"inputs[{index}] needs a 'name'")
        shape = _shape(name, tensor.shape)
        if raw:
            array = decode_binary_tensor(name, tensor.datatype, shape, memoryview(raw[index]))
        else:
            array = _from_contents(name, tensor.datatype, shape, tensor.contents)
        inputs.append(NamedTensor(name, array))
        if tensor.parameters:
            tensor_parameters[name] = parameters_of(tensor.parameters)
    outputs = [RequestedOutput(output.name, True) for output in request.outputs] or None
    return InferRequest(id=request.id or None, inputs=inputs, outputs=outputs, binary_output=True,
                        parameters=handler_parameters(parameters_of(request.parameters), tensor_parameters))


def encode_response(model_name: str, request: InferRequest, outputs: list[NamedTensor],
                    model_version: str = "1") -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    for tensor, _ in select_outputs(request, outputs):
        array = tensor.array
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=array.shape)
        response.raw_output_contents.append(
            pack_bytes(array) if array.dtype == object else np.ascontiguousarray(array).tobytes())
    return response


def model_metadata(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    response = pb.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                        platform=metadata["platform"])
    for kind in ("inputs", "outputs"):
        for tensor in metadata[kind]:
            getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    return response
