"""The protocol codecs and the worker channel are pure functions: test them by value."""

from __future__ import annotations

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
