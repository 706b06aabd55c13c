"""What a Triton or KServe user's clients expect of one server: gRPC V2, the statistics extension,
several models behind one front-end (a model repository with config.pbtxt files), signatures that
validate requests, and request parameters that reach a handler. Triton's own clients run in a
separate process (tests/runtime/triton_clients.py) against a real `forkless-runtime serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import HERE, v2_body

SIMPLE_CONFIG = """
# Triton's `simple` example, served by a forkless Python handler
name: "simple"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
parameters { key: "handler" value: { string_value: "handlers:%s" } }
"""


def write_repository(root: Path) -> Path:
    for name, handler, triton_type in (("simple", "TritonSimple", "TYPE_INT32"),
                                       ("simple_string", "TritonSimpleString", "TYPE_STRING")):
        (root / name).mkdir(parents=True)
        config = (SIMPLE_CONFIG % handler).replace('"simple"', f'"{name}"').replace("TYPE_INT32", triton_type)
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture
def several(serve, models, tmp_path):
    """One server: a repository of two Python models, a TorchScript model and a parameter echo."""
    repository = write_repository(tmp_path / "repository")
    return serve("--model-repository", str(repository), "--model", f"mlp={models / 'mlp.pt'}",
                 "--model", "echo=handlers:ParameterEcho", "--max-batch-delay-ms", "2")


@pytest.mark.slow
def test_triton_clients_over_http_and_grpc_against_several_models(several):
    run = subprocess.run([sys.executable, str(HERE / "triton_clients.py"), f"127.0.0.1:{several.port}",
                          f"127.0.0.1:{several.grpc_port}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    added, subtracted = list(range(1, 17)), list(range(-1, 15))

    http = seen["http"]
    assert http["binary"] == http["json"] == {"OUTPUT0": added, "OUTPUT1": subtracted}
    assert http["string"] == added
    before, after = http["stats_before"], http["stats_after"]
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 2
    assert after["execution_count"] >= before["execution_count"] + 1 and after["inference_count"] >= 2
    assert after["inference_stats"]["compute_infer"]["ns"] > 0 and after["batch_stats"][0]["batch_size"] >= 1
    assert http["all_stats"] == ["echo", "mlp", "simple", "simple_string"]
    assert {(m["name"], m["state"]) for m in http["index"]} == {
        ("simple", "READY"), ("simple_string", "READY"), ("mlp", "READY"), ("echo", "READY")}
    assert http["ready"] == {"simple": True, "simple_string": True, "nothing": False}
    assert "Request for unknown model: 'nothing' is not found" in http["unknown"]["message"]
    assert http["metadata"]["inputs"] == [{"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
                                          {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]}]
    assert {"statistics", "binary_tensor_data"} <= set(http["server"]["extensions"])
    assert {"sequence_id": 7, "priority": 2, "tag": "a"}.items() <= http["parameters"]["request"].items()
    assert http["parameters"]["inputs"] == {"INPUT0": {}, "INPUT1": {}}  # per input, when the handler asks

    grpc = seen["grpc"]
    assert grpc["live"] and grpc["ready"] and grpc["model_ready"]
    assert grpc["server"]["name"] == "forkless-runtime"
    assert [(t["name"], t["datatype"], t["shape"]) for t in grpc["metadata"]["outputs"]] == [
        ("OUTPUT0", "INT32", ["-1", "16"]), ("OUTPUT1", "INT32", ["-1", "16"])]  # int64 shapes: strings in JSON
    assert grpc["string_metadata"]["inputs"][0]["datatype"] == "BYTES"
    assert grpc["sums"] == {"OUTPUT0": added, "OUTPUT1": subtracted}
    assert grpc["only_output1"] == ["OUTPUT1"]
    assert grpc["string"] == subtracted
    assert {"sequence_id": 7, "flag": True, "tag": "b"}.items() <= grpc["parameters"]["request"].items()
    assert grpc["unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nothing'" in grpc["unknown"]["message"]
    assert grpc["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'INPUT0': the model expects shape [-1, 16], got [1, 17]" in grpc["bad_shape"]["message"]
    assert "input 'INPUT0': the model expects INT32, got FP32" in grpc["bad_datatype"]["message"]
    assert "missing input 'INPUT1'" in grpc["missing"]["message"]
    assert grpc["torch_model"] == [2, 3]
    assert seen["aio"] == {"concurrent": 1, "first": {"OUTPUT0": added, "OUTPUT1": subtracted}}

    # Both protocols are counted in one registry, each model under its own label; the server served on.
    metrics = several.client.get("/metrics").text
    assert metrics.count("# TYPE forkless_requests_total counter") == 1
    assert 'forkless_requests_total{model="simple",protocol="grpc",code="200"}' in metrics
    assert 'forkless_requests_total{model="simple",protocol="grpc",code="400"} 3' in metrics
    assert 'forkless_workers_ready{model="mlp"} 1' in metrics
    ready = several.client.get("/v2/health/ready").json()
    assert ready == {"ready": True, "models": {"simple": True, "simple_string": True, "mlp": True, "echo": True}}


def test_each_kind_of_invalid_request_gets_its_400_naming_the_tensor(serve, models, tmp_path):
    """A TorchScript model with a declared signature: checked before it is queued, outputs named as declared."""
    signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                 "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 3]}]}
    path = tmp_path / "signature.json"
    path.write_text(json.dumps(signature))
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--signature", str(path))
    c = server.client
    meta = c.get("/v2/models/mlp").json()
    assert meta["inputs"] == signature["inputs"] and meta["outputs"] == signature["outputs"]
    assert meta["parameters"]["signature"] == "declared"

    def infer(inputs: list[dict]) -> tuple[int, str]:
        answer = c.post("/v2/models/mlp/infer", json={"inputs": inputs})
        return answer.status_code, answer.json().get("error", "")

    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 16], "data": [0.5] * 32}
    assert infer([{**tensor, "shape": [2, 8], "data": [0.5] * 16}]) == (400, "input 'x': the model expects shape [-1, 16], got [2, 8] (-1: any size)")
    assert infer([{**tensor, "datatype": "INT64", "data": [1] * 32}]) == (400, "input 'x': the model expects FP32, got INT64")
    assert infer([tensor, {**tensor, "name": "y"}]) == (400, "unknown input 'y'; the model takes x")
    assert infer([{**tensor, "datatype": "BYTES", "data": ["a"] * 32}])[0] == 400
    # One input under another name is still taken (KServe's clients send `input-0`); outputs carry the declared name.
    answer = c.post("/v2/models/mlp/infer", json={"inputs": [{**tensor, "name": "input-0"}],
                                                  "outputs": [{"name": "OUTPUT__0"}]})
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["name"] == "OUTPUT__0" and output["shape"] == [2, 3]
    stats = c.get("/v2/models/mlp/versions/1/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] == 4 and stats["inference_stats"]["success"]["count"] == 1


def test_torchscript_without_a_signature_says_what_it_assumes(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"))
    meta = server.client.get("/v2/models/mlp").json()
    assert all(t["datatype"] for t in meta["inputs"] + meta["outputs"]), meta
    assert meta["parameters"]["signature"] == "assumed"
    assert any("declare the signature" in note for note in meta["parameters"]["notes"])
    answer = server.client.post("/v2/models/mlp/infer", json=v2_body(np.ones((1, 16), dtype=np.float32)))
    assert answer.status_code == 200


def test_a_signature_that_cannot_be_read_stops_the_server_with_the_reason(serve, models, tmp_path):
    bad = tmp_path / "config.pbtxt"
    bad.write_text('input [ { name: "x" data_type: TYPE_COMPLEX dims: [ 4 ] } ]')
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--signature", str(bad),
                   "--max-load-attempts", "1", wait=False)
    assert server.process.wait(timeout=90) == 1
    assert "data_type 'TYPE_COMPLEX'" in server.log()


def test_two_models_with_one_name_are_refused(serve, models):
    server = serve("--model-name", "m", "--model-uri", str(models / "mlp.pt"), "--model", f"m={models / 'cnn.pt'}",
                   wait=False)
    assert server.process.wait(timeout=60) == 1
    assert "model name(s) m given more than once" in server.log()


GRPC_UNDER_PRESSURE = """
import asyncio, sys
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

async def main():
    client = grpcaio.InferenceServerClient(sys.argv[1])
    async def one():
        tensor = grpcaio.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        try:
            await client.infer("slow", [tensor])
            return "OK"
        except InferenceServerException as error:
            return f"{error.status()}: {error.message()}"
    answers = await asyncio.gather(*(one() for _ in range(8)))
    await client.close()
    print("\\n".join(answers))

asyncio.run(main())
"""


@pytest.mark.slow
def test_grpc_requests_meet_the_same_queue_limit_and_timeout_as_http(serve):
    """One worker busy 1.5 s a request, two queue places, a 2.5 s timeout: of 8 at once one is answered,
    two wait and time out, five are refused at once; each with its gRPC code and the HTTP message."""
    server = serve("--model-name", "slow", "--format", "python", "--handler", "handlers:Doubler",
                   "--max-batch-size", "1", "--max-queue", "2", "--request-timeout-s", "2.5",
                   env={"TEST_HANDLER_DELAY_S": "1.5"})
    run = subprocess.run([sys.executable, "-c", GRPC_UNDER_PRESSURE, f"127.0.0.1:{server.grpc_port}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = run.stdout.splitlines()
    assert answers.count("OK") == 1, answers
    full = [a for a in answers if a.startswith("StatusCode.RESOURCE_EXHAUSTED: the queue is full")]
    late = [a for a in answers if a.startswith("StatusCode.DEADLINE_EXCEEDED: no answer within the request timeout")]
    assert (len(full), len(late)) == (5, 2), answers
    assert server.metric("forkless_requests_total") == 8
    assert server.client.get("/v2/health/ready").status_code == 200
