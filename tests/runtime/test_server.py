"""`forkless-runtime serve` as users run it: real processes, real HTTP, real models."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from .conftest import CLI, HERE, v2_body


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.05)


def reference(model_path: Path, x: np.ndarray) -> np.ndarray:
    import torch

    module = torch.jit.load(str(model_path))
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_two_spawned_workers_serve_correct_results_concurrently(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--workers", "2")
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda x: server.client.post("/v2/models/mlp/infer", json=v2_body(x)), inputs))
    for x, answer in zip(inputs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        assert out["name"] == "output-0" and out["shape"] == [x.shape[0], 3]
        np.testing.assert_allclose(np.array(out["data"]).reshape(-1, 3), reference(models / "mlp.pt", x), rtol=1e-5, atol=1e-6)


def test_both_workers_take_work_and_requests_are_batched_and_split_back(serve):
    server = serve("--model-name", "doubler", "--format", "python", "--handler", "handlers:Doubler", "--workers", "2",
                   "--max-batch-size", "8", env={"TEST_HANDLER_DELAY_S": "0.2"})
    xs = [np.full((1, 2), i, dtype=np.float32) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda x: server.client.post("/v2/models/doubler/infer", json=v2_body(x)).json(), xs))
    batches, pids = [], set()
    for x, answer in zip(xs, answers, strict=True):
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["doubled"]["data"] == (x * 2).reshape(-1).tolist()  # each request got its own rows back
        batches.append(outputs["batch"]["data"][0])
        pids.add(outputs["pid"]["data"][0])
    assert max(batches) > 1, "concurrent requests should have been batched"
    assert max(batches) <= 8
    assert pids == set(server.worker_pids().values())  # least-loaded dispatch used both workers
    assert server.metric("forkless_batch_size_count") < 24


def test_tritonclient_round_trips_in_binary_and_json_modes(serve, models):
    import tritonclient.http as triton

    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"))
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(3, 16)
    expected = reference(models / "mlp.pt", x)
    for binary in (True, False):
        tensor = triton.InferInput("input-0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = triton.InferRequestedOutput("output-0", binary_data=binary)
        result = client.infer("mlp", [tensor], outputs=[wanted])
        np.testing.assert_allclose(result.as_numpy("output-0"), expected, rtol=1e-5, atol=1e-6)
    result = client.infer("mlp", [tensor])  # no outputs named: every output comes back
    np.testing.assert_allclose(result.as_numpy("output-0"), expected, rtol=1e-5, atol=1e-6)
    assert client.get_model_metadata("mlp")["name"] == "mlp"


def test_kserve_v1_round_trip(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"))
    x = np.ones((2, 16), dtype=np.float32)
    answer = server.client.post("/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert answer.status_code == 200
    np.testing.assert_allclose(np.array(answer.json()["predictions"]), reference(models / "mlp.pt", x), rtol=1e-5)
    assert server.client.get("/v1/models/mlp").json() == {"name": "mlp", "ready": True}


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "linear.onnx"),
                   "--max-body-mb", "1")
    c = server.client
    cases = [
        (c.post("/v2/models/mlp/infer", content=b"{oops"), 400, "malformed JSON"),
        (c.post("/v2/models/mlp/infer", json={"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 5],
                                                          "data": [0] * 5}]}), 400, "expects shape [-1, 4]"),
        (c.post("/v2/models/mlp/infer", json={"inputs": [{"name": "features", "datatype": "INT64", "shape": [1, 4],
                                                          "data": [0] * 4}]}), 400, "expects FP32, got INT64"),
        (c.post("/v2/models/mlp/infer", json={"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                                                          "data": [0] * 3}]}), 400, "needs 4 elements, got 3"),
        (c.post("/v2/models/mlp/infer", json={"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [0] * 4},
                                                         {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": [0] * 4}]}),
         400, "unknown input 'a'; the model takes features"),
        (c.post("/v2/models/mlp/infer", content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "99"}),
         400, "Inference-Header-Content-Length is 99"),
        (c.post("/v2/models/other/infer", json=v2_body(np.zeros((1, 4)))), 404, "Request for unknown model: 'other' is not found"),
        (c.get("/v2/models/other"), 404, "Request for unknown model: 'other'"),
        (c.post("/v2/models/mlp/infer", content=b"x" * (2 * 1024 * 1024)), 413, "larger than 1 MB"),
        (c.post("/v1/models/mlp:predict", json={"instances": [[1, 2], [3]]}), 400, "rectangular"),
        (c.post("/v1/models/mlp:predict", json={"rows": []}), 400, "'instances'"),
        (c.put("/v2/models/mlp/infer"), 405, "not allowed"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"]
    good = c.post("/v2/models/mlp/infer", json={"inputs": [{"name": "anything", "datatype": "FP32", "shape": [2, 4],
                                                            "data": [1, 0, 0, 0, 0, 1, 0, 0]}]})
    assert good.status_code == 200
    assert good.json()["outputs"][0]["name"] == "scores"
    np.testing.assert_allclose(good.json()["outputs"][0]["data"], [1.0, -0.9, 0.7, 1.3, -0.6, 1.0], rtol=1e-6)
    assert server.metric("forkless_requests_total") >= len(cases) - 3


def test_bytes_sent_to_a_torchscript_model_is_a_400(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"))
    answer = server.client.post("/v2/models/mlp/infer", json={
        "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
    assert answer.status_code == 400
    assert "numeric tensors, not BYTES" in answer.json()["error"]


def test_a_model_error_is_a_500_with_its_message_and_the_worker_survives(serve):
    server = serve("--model-name", "doubler", "--format", "python", "--handler", "handlers:Doubler")
    pids = server.worker_pids()
    bad = server.client.post("/v2/models/doubler/infer", json=v2_body(np.array([[-1.0]], dtype=np.float32)))
    assert bad.status_code == 500
    assert "ValueError: negative inputs are not allowed" in bad.json()["error"]
    good = server.client.post("/v2/models/doubler/infer", json=v2_body(np.array([[3.0]], dtype=np.float32)))
    assert good.status_code == 200
    assert server.worker_pids() == pids


def test_a_full_queue_answers_503_with_retry_after_and_timeouts_answer_504(serve):
    server = serve("--model-name", "slow", "--format", "python", "--handler", "handlers:Doubler", "--max-queue", "2",
                   "--max-batch-size", "1", "--request-timeout-s", "1.5", env={"TEST_HANDLER_DELAY_S": "1.0"})
    body = v2_body(np.ones((1, 1), dtype=np.float32))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.client.post("/v2/models/slow/infer", json=body), range(8)))
    codes = sorted(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 503]
    assert refused and all(a.headers["retry-after"] == "1" and "queue is full" in a.json()["error"] for a in refused)
    assert 200 in codes
    assert 504 in codes, codes  # the ones queued behind a 1 s request with a 1.5 s budget
    assert all(c in (200, 503, 504) for c in codes)
    # The server keeps serving: once the worker has finished the request it had begun before that request's
    # deadline passed (its caller was told 504; a running handler is not interrupted), a new request succeeds.
    wait_until(lambda: server.client.post("/v2/models/slow/infer", json=body).status_code == 200, 10,
               "a request after the burst to succeed")


def test_a_request_whose_client_hung_up_in_the_queue_is_never_run(serve):
    # One worker, busy for 1 s with the first request; the second's client sends it and hangs up while it
    # waits. The queue drops it (499 in the metrics) instead of spending the worker's next second on it.
    server = serve("--model-name", "slow", "--format", "python", "--handler", "handlers:Doubler", "--workers", "1",
                   "--max-batch-size", "1", "--request-timeout-s", "30", env={"TEST_HANDLER_DELAY_S": "1.0"})
    body = json.dumps(v2_body(np.ones((1, 1), dtype=np.float32))).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(server.client.post, "/v2/models/slow/infer", content=body)
        wait_until(lambda: server.metric("forkless_requests_in_flight") == 1, 10, "the first request running")
        with socket.create_connection((host, int(port))) as abandoned:
            abandoned.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: server.metric("forkless_queue_depth") == 1, 10, "the second request queued")
        assert first.result().status_code == 200
    third = server.client.post("/v2/models/slow/infer", content=body)
    assert third.status_code == 200
    metrics = server.client.get("/metrics").text
    assert 'code="499"} 1' in metrics, metrics
    assert server.metric("forkless_batch_size_count") == 2  # the first and the third: the second never ran


def test_kill_9_of_a_worker_under_load_leaves_no_request_hanging(serve, models):
    server = serve("--model-name", "cnn", "--model-uri", str(models / "cnn.pt"), "--workers", "2",
                   "--request-timeout-s", "60")
    body = v2_body(np.zeros((1, 3, 64, 64), dtype=np.float32))
    results: list[int] = []
    stop = time.monotonic() + 8

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while time.monotonic() < stop:
                results.append(client.post("/v2/models/cnn/infer", json=body).status_code)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(client_loop) for _ in range(8)]
        wait_until(lambda: results.count(200) >= 8, 30, "the load flowing")
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        for loop in loops:
            loop.result()  # a hung request would raise httpx.ReadTimeout here
    assert results and set(results) <= {200, 503}
    assert results.count(200) > 0.9 * len(results)
    deadline = time.monotonic() + 60
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = server.worker_pids()
    assert len(pids) == 2 and victim not in pids.values()
    assert server.metric("forkless_worker_restarts_total") == 1
    assert "worker 0 (pid" in server.log() and "died" in server.log()


def test_sigterm_drains_in_flight_requests_then_exits_0_leaving_no_process(serve):
    server = serve("--model-name", "slow", "--format", "python", "--handler", "handlers:Doubler", "--workers", "2",
                   "--max-batch-size", "1", "--grace-period-s", "20", env={"TEST_HANDLER_DELAY_S": "1.5"})
    children = psutil.Process(server.process.pid).children(recursive=True)
    body = v2_body(np.ones((1, 1), dtype=np.float32))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(server.client.post, "/v2/models/slow/infer", json=body) for _ in range(4)]
        # Two running (one per worker), two queued behind them.
        wait_until(lambda: server.metric("forkless_queue_depth") == 2, 10, "two requests queued")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: server.client.get("/v2/health/ready").status_code == 503, 5, "readiness off")
        late = server.client.post("/v2/models/slow/infer", json=body)
        answers = [f.result() for f in inflight]
    assert late.status_code == 503 and "shutting down" in late.json()["error"]
    assert [a.status_code for a in answers] == [200] * 4
    assert server.process.wait(timeout=30) == 0
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left behind: {alive}"


def test_the_front_end_never_imports_torch_nor_maps_libtorch(serve, models, tmp_path):
    probe_out = tmp_path / "probe.json"
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--workers", "2",
                   command=[sys.executable, str(HERE / "frontend_probe.py")], env={"PROBE_OUT": str(probe_out)})
    for _ in range(20):
        assert server.client.post("/v2/models/mlp/infer", json=v2_body(np.ones((1, 16), np.float32))).status_code == 200
    front_maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    worker_maps = Path(f"/proc/{next(iter(server.worker_pids().values()))}/maps").read_text()
    assert "libtorch" in worker_maps  # the probe can see libtorch where it is
    assert "libtorch" not in front_maps and "libcuda" not in front_maps
    assert server.stop() == 0
    assert json.loads(probe_out.read_text()) == {"frameworks": []}


@pytest.mark.parametrize("model_file,name", [("mlp.pt2", "mlp"), ("linear.onnx", "linear")])
def test_torch_export_and_onnx_models_serve_with_their_real_metadata(serve, models, model_file, name):
    server = serve("--model-name", name, "--model-uri", f"file://{models / model_file}")
    meta = server.client.get(f"/v2/models/{name}").json()
    features = meta["inputs"][0]["shape"][-1]
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == [-1, features]
    assert meta["parameters"]["batchable"] is True
    x = np.ones((5, features), dtype=np.float32)
    answer = server.client.post(f"/v2/models/{name}/infer", json=v2_body(x))
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [5, 3]
    if model_file == "mlp.pt2":
        np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"]).reshape(5, 3),
                                   reference(models / "mlp.pt", x), rtol=1e-5, atol=1e-6)


def test_an_async_python_handler_serves_bytes_tensors(serve):
    server = serve("--model-name", "upper", "--format", "python", "--handler", "handlers:AsyncUpper")
    answer = server.client.post("/v2/models/upper/infer", json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["abc", "Δx"]}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0] == {"name": "output-0", "datatype": "BYTES", "shape": [2], "data": ["ABC", "ΔX"]}


def test_workers_get_their_thread_budget_and_no_gpu_before_torch_loads(serve):
    server = serve("--model-name", "probe", "--format", "python", "--handler", "handlers:TorchProbe",
                   "--workers", "2", "--threads-per-worker", "1", "--start-method", "forkserver")
    outputs = {o["name"]: o["data"] for o in server.client.post(
        "/v2/models/probe/infer", json=v2_body(np.ones((1, 1), np.float32))).json()["outputs"]}
    assert outputs == {"threads": [1], "omp": [1], "cuda_visible": [""]}


def test_a_worker_killed_while_loading_is_reported_as_out_of_memory(serve):
    from forkless_runtime.termination import load_failure_reason

    server = serve("--model-name", "big", "--format", "python", "--handler", "handlers:KilledWhileLoading",
                   "--max-load-attempts", "1", wait=False)
    assert server.process.wait(timeout=90) == 1
    line = next(line for line in server.log().splitlines() if "the model cannot be loaded" in line)
    assert "killed (SIGKILL) while loading the model: most likely out of memory" in line
    assert load_failure_reason(line) == "ModelOutOfMemory"


def test_a_model_that_cannot_load_exits_non_zero_with_the_loaders_error(serve, models, tmp_path):
    server = serve("--model-name", "broken", "--format", "python", "--handler", "handlers:CannotLoad",
                   "--max-load-attempts", "2", wait=False)
    assert server.process.wait(timeout=90) == 1
    assert "weights.bin is missing from the model directory" in server.log()
    missing = subprocess.run([CLI, "check", "--model-name", "m", "--model-uri", str(tmp_path / "nope.pt")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "nope.pt" in missing.stderr
    ok = subprocess.run([CLI, "check", "--model-name", "m", "--model-uri", str(models / "mlp.pt2")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: m (torch-export)")
