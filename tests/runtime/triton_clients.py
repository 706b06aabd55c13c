"""Triton's own clients (tritonclient.http, .grpc, .grpc.aio) against a running server, as a user runs them.

Run in its own process (`python triton_clients.py HTTP_URL GRPC_URL`): tritonclient's generated
protobuf module and the server's both define the `inference` package, and one Python process
cannot hold both. Prints one JSON object of what each call returned or raised; the test asserts.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

FIRST = np.arange(16, dtype=np.int32).reshape(1, 16)
SECOND = np.ones((1, 16), dtype=np.int32)


def simple_inputs(module: Any, first: np.ndarray = FIRST, second: np.ndarray = SECOND,
                  binary: bool = True) -> list[Any]:
    inputs = []
    for name, array in (("INPUT0", first), ("INPUT1", second)):
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if module is httpclient:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def string_inputs(module: Any) -> list[Any]:
    first = np.array([str(i).encode() for i in range(16)], dtype=object).reshape(1, 16)
    second = np.array([b"1"] * 16, dtype=object).reshape(1, 16)
    return simple_inputs(module, first, second)


def error_of(call: Any) -> dict[str, Any]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "no error"}


def sums(result: Any) -> dict[str, list[int]]:
    return {name: result.as_numpy(name).astype(np.int64).reshape(-1).tolist() for name in ("OUTPUT0", "OUTPUT1")}


def http_calls(url: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(url)
    seen: dict[str, Any] = {}
    before = client.get_inference_statistics("simple")["model_stats"][0]
    seen["binary"] = sums(client.infer("simple", simple_inputs(httpclient)))
    seen["json"] = sums(client.infer("simple", simple_inputs(httpclient, binary=False)))
    strings = client.infer("simple_string", string_inputs(httpclient))
    seen["string"] = [int(x) for x in strings.as_numpy("OUTPUT0").reshape(-1)]
    after = client.get_inference_statistics("simple")["model_stats"][0]
    seen["stats_before"], seen["stats_after"] = before, after
    seen["all_stats"] = sorted(m["name"] for m in client.get_inference_statistics()["model_stats"])
    seen["index"] = client.get_model_repository_index()
    seen["ready"] = {name: client.is_model_ready(name) for name in ("simple", "simple_string", "nothing")}
    seen["unknown"] = error_of(lambda: client.infer("nothing", simple_inputs(httpclient)))
    seen["metadata"] = client.get_model_metadata("simple")
    seen["server"] = client.get_server_metadata()
    echo = client.infer("echo", simple_inputs(httpclient), sequence_id=7, priority=2, parameters={"tag": "a"})
    seen["parameters"] = json.loads(echo.as_numpy("output-0")[0])
    client.close()
    return seen


def grpc_calls(url: str) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url)
    seen: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("simple"),
        "server": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata("simple", as_json=True),
        "string_metadata": client.get_model_metadata("simple_string", as_json=True),
    }
    seen["sums"] = sums(client.infer("simple", simple_inputs(grpcclient), request_id="r-1"))
    only = client.infer("simple", simple_inputs(grpcclient), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    seen["only_output1"] = [o.name for o in only.get_response().outputs]
    strings = client.infer("simple_string", string_inputs(grpcclient))
    seen["string"] = [int(x) for x in strings.as_numpy("OUTPUT1").reshape(-1)]
    echo = client.infer("echo", simple_inputs(grpcclient), sequence_id=7, parameters={"flag": True, "tag": "b"})
    seen["parameters"] = json.loads(echo.as_numpy("output-0")[0])
    seen["unknown"] = error_of(lambda: client.infer("nothing", simple_inputs(grpcclient)))
    wide = np.zeros((1, 17), dtype=np.int32)
    seen["bad_shape"] = error_of(lambda: client.infer("simple", simple_inputs(grpcclient, wide, wide)))
    floats = np.zeros((1, 16), dtype=np.float32)
    seen["bad_datatype"] = error_of(lambda: client.infer("simple", simple_inputs(grpcclient, floats, floats)))
    missing = simple_inputs(grpcclient)[:1]
    seen["missing"] = error_of(lambda: client.infer("simple", missing))
    seen["torch_model"] = client.infer("mlp", [_mlp_input(grpcclient)]).as_numpy("output-0").shape
    client.close()
    return seen


def _mlp_input(module: Any) -> Any:
    tensor = module.InferInput("x", [2, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
    return tensor


async def grpc_aio_calls(url: str) -> dict[str, Any]:
    client = grpcaio.InferenceServerClient(url)
    results = await asyncio.gather(*(client.infer("simple", simple_inputs(grpcaio)) for _ in range(20)))
    await client.close()
    return {"concurrent": len({json.dumps(sums(r)) for r in results}), "first": sums(results[0])}


def main() -> None:
    http_url, grpc_url = sys.argv[1], sys.argv[2]
    seen = {"http": http_calls(http_url), "grpc": grpc_calls(grpc_url), "aio": asyncio.run(grpc_aio_calls(grpc_url))}
    print(json.dumps(seen, default=lambda value: list(value) if isinstance(value, tuple) else str(value)))


if __name__ == "__main__":
    main()
