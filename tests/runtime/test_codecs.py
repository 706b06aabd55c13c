"""The protocol codecs and the worker channel are pure functions: test them by value."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest
from forkless_runtime.channel import ShmRing, decode_frame, encode_frame, pack_tensors, unpack_tensors
from forkless_runtime.protocol import v1, v2
from forkless_runtime.protocol.tensors import NamedTensor, ProtocolError, pack_bytes


def binary_body(inputs: list[tuple[str, str, np.ndarray]]) -> tuple[bytes, int]:
    header = {"inputs": []}
    blobs = []
    for name, datatype, array in inputs:
        blob = pack_bytes(array) if datatype == "BYTES" else array.tobytes()
        header["inputs"].append({"name": name, "datatype": datatype, "shape": list(array.shape),
                                 "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = orjson.dumps(header)
    return head + b"".join(blobs), len(head)


@pytest.mark.parametrize("datatype,dtype", [
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
])
def test_every_numeric_datatype_round_trips_in_json_and_binary(datatype, dtype):
    array = (np.arange(6) % 2 == 0) if dtype is np.bool_ else np.arange(6).astype(dtype)
    array = array.reshape(2, 3)
    json_req = v2.decode_request(orjson.dumps({"inputs": [
        {"name": "x", "datatype": datatype, "shape": [2, 3], "data": array.reshape(-1).tolist()}]}))
    body, length = binary_body([("x", datatype, array)])
    bin_req = v2.decode_request(body, length)
    for request in (json_req, bin_req):
        (tensor,) = request.inputs
        assert tensor.array.dtype == np.dtype(dtype) and tensor.datatype == datatype
        np.testing.assert_array_equal(tensor.array, array)
        response, json_length = v2.encode_response("m", request, [NamedTensor("y", tensor.array)])
        assert json_length is None
        out = orjson.loads(response)["outputs"][0]
        assert out["datatype"] == datatype and out["shape"] == [2, 3]
        np.testing.assert_array_equal(np.array(out["data"], dtype=dtype).reshape(2, 3), array)


def test_bytes_tensors_round_trip_and_binary_output_is_framed():
    words = np.array([b"alpha", b"", "βeta".encode()], dtype=object)
    body, length = binary_body([("s", "BYTES", words)])
    request = v2.decode_request(body, length)
    assert list(request.inputs[0].array) == list(words)
    request.binary_output = True
    response, json_length = v2.encode_response("m", request, [NamedTensor("s", words)])
    header = orjson.loads(response[:json_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(response) - json_length
    assert response[json_length:] == pack_bytes(words)


def with_binary(header: bytes, blob: bytes) -> tuple[bytes, int]:
    return header + blob, len(header)


@pytest.mark.parametrize("body,length,message", [
    (b"{not json", None, "malformed JSON"),
    (b"[]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty list"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2, 3]}]}', None, "needs 2 elements, got 3"),
    (b'{"inputs": [{"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}]}', None, "unknown datatype"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "non-negative integers"),
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}', None, "not valid INT8"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}', None, "not valid FP32"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "neither 'data'"),
    (*with_binary(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}',
                  b"\x00\x00"), "binary_data_size 4 runs past"),
    (*with_binary(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]}',
                  b"\x00" * 4), "needs 8"),
    (*with_binary(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}',
                  b"\x00" * 6), "2 binary bytes follow"),
    (b'{}', 50, "Inference-Header-Content-Length is 50"),
])
def test_malformed_requests_name_the_problem(body, length, message):
    with pytest.raises(ProtocolError, match=message):
        v2.decode_request(body, length)


def test_bytes_element_lengths_that_run_past_the_data_are_rejected():
    blob = b"\x10\x00\x00\x00abc"
    head = orjson.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}]})
    with pytest.raises(ProtocolError, match="claims 16 bytes"):
        v2.decode_request(head + blob, len(head))


def test_requested_outputs_are_selected_and_unknown_ones_rejected():
    request = v2.decode_request(orjson.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
        "outputs": [{"name": "b", "parameters": {"binary_data": False}}]}))
    outputs = [NamedTensor("a", np.zeros(1, np.float32)), NamedTensor("b", np.ones(1, np.float32))]
    body, _ = v2.encode_response("m", request, outputs)
    assert [o["name"] for o in orjson.loads(body)["outputs"]] == ["b"]
    request.outputs[0].name = "c"
    with pytest.raises(ProtocolError, match="unknown output 'c'"):
        v2.encode_response("m", request, outputs)


def test_v1_numbers_become_the_model_datatype():
    (tensor,), _ = v1.decode_request(b'{"instances": [[1, 2], [3, 4]]}', [])
    assert tensor.array.dtype == np.float32 and tensor.array.shape == (2, 2)
    (tensor,), _ = v1.decode_request(b'{"instances": [[1, 2]]}', [{"name": "ids", "datatype": "INT64", "shape": [-1, 2]}])
    assert tensor.name == "ids" and tensor.array.dtype == np.int64
    with pytest.raises(ProtocolError, match=r"rectangular|same shape"):
        v1.decode_request(b'{"instances": [[1, 2], [3]]}', [])
    assert orjson.loads(v1.encode_response([NamedTensor("y", np.array([[1.5], [2.5]], np.float32))])) == {
        "predictions": [[1.5], [2.5]]}


def test_channel_frames_carry_tensors_inline_and_through_the_shared_ring():
    ring = ShmRing(1 << 20)
    try:
        small = np.arange(4, dtype=np.float32)
        big_parts = [np.full((1, 64, 64), i, dtype=np.float32) for i in range(3)]
        words = np.array([b"x", b"yz"], dtype=object)
        descriptions, payload, allocations = pack_tensors([("small", [small]), ("big", big_parts), ("w", [words])], ring)
        assert "inline" in descriptions[0] and "shm" in descriptions[1] and len(allocations) == 1
        header, inline = decode_frame(encode_frame({"inputs": descriptions}, payload))
        tensors = unpack_tensors(header["inputs"], inline, ring.buffer)
        np.testing.assert_array_equal(tensors[0].array, small)
        np.testing.assert_array_equal(tensors[1].array, np.concatenate(big_parts))
        assert list(tensors[2].array) == [b"x", b"yz"]
        del tensors
    finally:
        ring.close()


def test_ring_frees_in_order_and_wraps_around():
    ring = ShmRing(1024)
    try:
        first = ring.allocate(400)
        second = ring.allocate(400)
        assert (first, second) == (0, 448)
        assert ring.allocate(400) is None  # full: the caller falls back to inline
        ring.release(first)
        assert ring.allocate(300) == 0  # wrapped into the space the first block freed
        ring.release(second)
        assert ring.allocate(2000) is None
    finally:
        ring.close()


def test_the_crds_datatypes_are_the_codecs():
    from forkless_runtime.protocol.tensors import DATATYPE_TO_DTYPE
    from forkless_runtime.settings import DATATYPES

    assert tuple(DATATYPE_TO_DTYPE) == DATATYPES


TRITON_CONFIG = """
name: "simple"  # Triton's example
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "TEXT", data_type: TYPE_STRING, dims: [ -1 ] } ]
output { name: "OUTPUT0" data_type: TYPE_FP16 dims: [ 4, 4 ] }
parameters { key: "handler" value: { string_value: "pkg.mod:Class" } }
"""


def test_a_triton_config_gives_the_signature_with_its_batch_dimension():
    from forkless_runtime.protocol import signature

    config = signature.parse_pbtxt(TRITON_CONFIG)
    assert config["parameters"]["value"]["string_value"] == "pkg.mod:Class"
    assert signature.from_model_config(config) == {
        "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
                   {"name": "TEXT", "datatype": "BYTES", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP16", "shape": [-1, 4, 4]}],
    }
    unbatched = signature.from_model_config(signature.parse_pbtxt(TRITON_CONFIG.replace("max_batch_size: 8", "")))
    assert unbatched["inputs"][0]["shape"] == [16]
    with pytest.raises(signature.SignatureError, match="TYPE_COMPLEX"):
        signature.from_model_config(signature.parse_pbtxt('input { name: "x" data_type: TYPE_COMPLEX }'))
    with pytest.raises(signature.SignatureError, match="ends inside"):
        signature.parse_pbtxt("input [ { name: ")
    with pytest.raises(signature.SignatureError, match="unique 'name'"):
        signature.load('{"inputs": [{"name": "a", "datatype": "FP32"}, {"name": "a", "datatype": "FP32"}]}')


def test_requests_are_checked_against_the_signature_by_name_or_a_single_input_by_position():
    from forkless_runtime.protocol.signature import check_request

    declared = [{"name": "a", "datatype": "FP32", "shape": [-1, 2]}, {"name": "b", "datatype": "INT64", "shape": [-1]}]
    assert check_request([("b", "INT64", (3,)), ("a", "FP32", (3, 2))], declared) == [1, 0]
    for sent, message in [([("a", "FP32", (3, 2))], "missing input 'b'"),
                          ([("a", "FP32", (3, 2)), ("c", "INT64", (3,))], "unknown input 'c'"),
                          ([("a", "FP64", (3, 2)), ("b", "INT64", (3,))], "expects FP32, got FP64"),
                          ([("a", "FP32", (3, 3)), ("b", "INT64", (3,))], "expects shape [-1, 2], got [3, 3]")]:
        with pytest.raises(ProtocolError, match=re.escape(message)):
            check_request(sent, declared)
    assert check_request([("input-0", "FP32", (1, 2))], declared[:1]) is None  # KServe's single input, any name


def test_grpc_requests_decode_from_raw_and_typed_contents_and_answer_raw():
    from forkless_runtime.protocol import grpc_service_pb2 as pb
    from forkless_runtime.protocol import grpc_v2

    request = pb.ModelInferRequest(model_name="m", id="r")
    request.inputs.add(name="a", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2, 3, 4])
    request.parameters["sequence_id"].int64_param = 7
    request.parameters["binary_data_output"].bool_param = True  # the protocol's own: never reaches a handler
    decoded = grpc_v2.decode_request(request)
    assert decoded.inputs[0].array.tolist() == [[1, 2], [3, 4]] and decoded.inputs[0].datatype == "INT32"
    assert decoded.parameters == {"request": {"sequence_id": 7}, "inputs": {}}
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="h", datatype="FP16", shape=[3])
    raw.raw_input_contents.append(np.array([1, 2, 3], dtype=np.float16).tobytes())
    assert grpc_v2.decode_request(raw).inputs[0].array.tolist() == [1, 2, 3]
    response = grpc_v2.encode_response("m", decoded, [NamedTensor("out", np.arange(3, dtype=np.float32))])
    assert response.id == "r" and response.outputs[0].shape == [3]
    assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist() == [0, 1, 2]

    wrong = pb.ModelInferRequest()
    wrong.inputs.add(name="a", datatype="FP32", shape=[4]).contents.fp32_contents.extend([1.0])
    with pytest.raises(ProtocolError, match="needs 4 elements, got 1"):
        grpc_v2.decode_request(wrong)
    half = pb.ModelInferRequest()
    half.inputs.add(name="h", datatype="FP16", shape=[1])
    with pytest.raises(ProtocolError, match="only in raw_input_contents"):
        grpc_v2.decode_request(half)
    short = pb.ModelInferRequest()
    short.inputs.add(name="a", datatype="FP32", shape=[1])
    short.inputs.add(name="b", datatype="FP32", shape=[1])
    short.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(ProtocolError, match="one per input"):
        grpc_v2.decode_request(short)


def test_the_committed_grpc_messages_are_generated_from_the_proto(tmp_path):
    """One source: the .proto; `make proto` regenerates the pb2 this test compares against."""
    import subprocess
    import sys
    from pathlib import Path

    protocol = Path(__file__).resolve().parents[2] / "runtime" / "forkless_runtime" / "protocol"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{protocol / 'proto'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", "grpc_service.proto"], check=True)
    for name in ("grpc_service_pb2.py", "grpc_service_pb2.pyi"):
        assert (tmp_path / name).read_bytes() == (protocol / name).read_bytes(), f"{name} is stale: run make proto"
