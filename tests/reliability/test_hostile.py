"""Hand-made hostile requests: each gets a 4xx naming what is wrong, and the server keeps serving.

Huge bodies, deep nesting, NaN/Inf, lying binary header lengths, bad BYTES lengths, slow clients
that hold connections open, clients that vanish mid-request.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from tests.runtime.conftest import start_server, v2_body

MAX_BODY_MB = 1
X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("hostile"), "--model-name", "mlp", "--model-uri",
                          str(models / "mlp.pt"), "--max-body-mb", str(MAX_BODY_MB))
    yield server
    assert "Exception in ASGI application" not in server.log()
    server.stop()


def still_serving(server) -> None:
    assert server.process.poll() is None, server.log()[-3000:]
    answer = server.client.post("/v2/models/mlp/infer", json=v2_body(X))
    assert answer.status_code == 200, answer.text
    assert server.client.get("/v2/health/ready").status_code == 200


def raw_request(server, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes as they are; return the status and the response body (the connection is then closed)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = int(next((line.split(b":")[1] for line in head_part.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head_part.split(b" ")[1]), rest


def post_head(path: str, length: int, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n").encode() + extra + b"\r\n"


# --- huge bodies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v1/models/mlp:predict"])
def test_a_body_over_the_limit_is_413_before_it_is_read(server, path):
    started = time.monotonic()
    status, body = raw_request(server, post_head(path, 10**12))  # claims a terabyte, sends nothing
    assert status == 413 and "larger than 1 MB" in json.loads(body)["error"]
    assert time.monotonic() - started < 2
    still_serving(server)


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(4 * MAX_BODY_MB):
            yield b" " * (256 * 1024 + 1)

    answer = server.client.post("/v2/models/mlp/infer", content=chunks())  # no Content-Length
    assert answer.status_code == 413, answer.text
    still_serving(server)


def test_a_body_just_under_the_limit_is_read(server):
    body = json.dumps(v2_body(X)).encode()
    padded = body + b" " * (MAX_BODY_MB * 1024 * 1024 - len(body) - 1)
    assert server.client.post("/v2/models/mlp/infer", content=padded).status_code == 200


# --- deep nesting, NaN, Inf ---------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [100, 100_000])
@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v1/models/mlp:predict"])
def test_deeply_nested_json_is_400(server, path, depth):
    nested = "[" * depth + "1" + "]" * depth
    for body in (nested, f'{{"inputs": {nested}, "instances": {nested}}}',
                 f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [1], "data": {nested}}}]}}',
                 '{"a":' * depth + "1" + "}" * depth):
        answer = server.client.post(path, content=body.encode())
        assert answer.status_code == 400, (depth, body[:40], answer.text)
        assert answer.json()["error"]
    still_serving(server)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "nan"])
def test_nan_and_infinity_literals_are_400(server, literal):
    body = f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [{literal}{", 0" * 15}]}}]}}'
    answer = server.client.post("/v2/models/mlp/infer", content=body.encode())
    assert answer.status_code == 400, answer.text
    answer = server.client.post("/v1/models/mlp:predict", content=f'{{"instances": [[{literal}]]}}'.encode())
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize("element", ["null", '"nan"'])
def test_a_null_or_a_string_is_not_a_float(server, element):
    """JSON cannot carry NaN; a null (or "nan") in FP32 data must not turn into one silently."""
    body = f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [{element}{", 0" * 15}]}}]}}'
    answer = server.client.post("/v2/models/mlp/infer", content=body.encode())
    assert answer.status_code == 400, answer.text


# --- binary tensor data that lies about its lengths ------------------------------------------------------
def binary_request(server, header: dict, blob: bytes, header_length: int | str | None = None):
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return server.client.post("/v2/models/mlp/infer", content=head + blob,
                              headers={"Inference-Header-Content-Length": str(length),
                                       "Content-Type": "application/octet-stream"})


def fp32_header(size: int, shape=(2, 16)) -> dict:
    return {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(shape),
                        "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("case", ["header-longer-than-body", "negative", "not-a-number", "cuts-the-json",
                                  "size-past-the-end", "bytes-left-over", "size-not-the-shape", "huge-size"])
def test_mismatched_binary_lengths_are_400(server, case):
    blob = X.tobytes()
    header, length = fp32_header(len(blob)), None
    if case == "header-longer-than-body":
        length = 10**9
    elif case == "negative":
        length = -5
    elif case == "not-a-number":
        length = "12abc"
    elif case == "cuts-the-json":
        length = 7
    elif case == "size-past-the-end":
        header = fp32_header(len(blob) + 4)
    elif case == "bytes-left-over":
        blob += b"\0" * 8
    elif case == "size-not-the-shape":
        header, blob = fp32_header(len(blob) - 4), blob[:-4]
    elif case == "huge-size":
        header = fp32_header(2**62)
    answer = binary_request(server, header, blob, length)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]
    still_serving(server)


@pytest.mark.parametrize("case", ["length-past-the-end", "max-u32-length", "truncated-prefix", "trailing-bytes",
                                  "fewer-elements"])
def test_bytes_tensors_with_bad_lengths_are_400(server, case):
    good = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 2) + b"de"
    blob = {
        "length-past-the-end": struct.pack("<I", 3) + b"abc" + struct.pack("<I", 50) + b"de",
        "max-u32-length": struct.pack("<I", 0xFFFFFFFF) + b"abc",
        "truncated-prefix": good + b"\x01\x00",
        "trailing-bytes": good + b"zz",
        "fewer-elements": good[:7],
    }[case]
    header = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": len(blob)}}]}
    answer = binary_request(server, header, blob)
    assert answer.status_code == 400, answer.text
    assert "BYTES" in answer.json()["error"]
    still_serving(server)


# --- slow clients and vanishing clients ------------------------------------------------------------------
@pytest.mark.slow
def test_slow_clients_holding_connections_do_not_stop_normal_clients(server):
    """Slowloris: hundreds of connections trickling headers (and bodies) a byte at a time."""
    head = post_head("/v2/models/mlp/infer", 1000)
    stop = threading.Event()
    sockets: list[socket.socket] = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sockets.append(sock)

    def trickle() -> None:
        position = 0
        while not stop.is_set():
            data = (head + b"{" * 1000)[position : position + 1]  # headers, then a body that never ends
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(data)
            position += 1
            stop.wait(0.02)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        latencies = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            started = time.perf_counter()
            answer = server.client.post("/v2/models/mlp/infer", json=v2_body(X))
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
        assert len(latencies) >= 20
        assert max(latencies) < 1.0, f"a normal request took {max(latencies):.2f}s beside the slow clients"
    finally:
        stop.set()
        thread.join()
        for sock in sockets:
            sock.close()
    still_serving(server)


def test_a_client_that_disconnects_mid_body_leaves_the_server_serving(server):
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(post_head("/v2/models/mlp/infer", 5000) + b'{"inputs": [{"name": "x", ')
    still_serving(server)


@pytest.mark.slow
def test_clients_that_disconnect_while_their_request_runs_leave_nothing_behind(serve):
    server = serve("--model-name", "doubler", "--format", "python", "--handler", "handlers:Doubler",
                   "--max-batch-size", "1", env={"TEST_HANDLER_DELAY_S": "0.05"})
    body = json.dumps(v2_body(np.ones((1, 2), dtype=np.float32))).encode()

    def hang_up() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(post_head("/v2/models/doubler/infer", len(body)) + body)
            time.sleep(0.01)  # queued or running when the client goes

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda _: hang_up(), range(40)))
    deadline = time.monotonic() + 10
    while server.metric("forkless_queue_depth") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("forkless_queue_depth") == 0
    answer = server.client.post("/v2/models/doubler/infer", json=v2_body(np.ones((1, 2), dtype=np.float32)))
    assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [2.0, 2.0]
    assert "Exception in ASGI application" not in server.log()


@pytest.mark.parametrize(("method", "path"), [("GET", "/v2/models/mlp/infer"), ("POST", "/v2/models/mlp/explain"),
                                              ("POST", "/v1/models/mlp:explain")])
def test_a_wrong_route_on_the_served_model_does_not_call_it_unknown(server, method, path):
    answer = server.client.request(method, path, json=v2_body(X))
    assert answer.status_code == 404
    assert "unknown model" not in answer.json()["error"], answer.text
    answer = server.client.post("/v2/models/other/infer", json=v2_body(X))
    assert answer.status_code == 404 and "Request for unknown model: 'other' is not found" in answer.json()["error"]
