"""Python handlers the tests serve (`--format python --handler handlers:Name`), imported only in workers."""

from __future__ import annotations

import os
import time

import numpy as np


class Doubler:
    """Returns 2x its input and the batch size it saw, so tests can see batching happen."""

    # What `forkless-runtime plan` takes from a handler, whose code it cannot trace.
    memory = {"parameter_bytes": 1000, "activation_bytes_per_sample": 64}

    def load(self) -> None:
        self.delay = float(os.environ.get("TEST_HANDLER_DELAY_S", "0"))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (x,) = inputs.values()
        if self.delay:
            time.sleep(self.delay)
        if (x < 0).any():
            raise ValueError("negative inputs are not allowed by this model")
        return {"doubled": x * 2, "batch": np.full((x.shape[0], 1), x.shape[0], dtype=np.int64),
                "pid": np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)}


class AsyncUpper:
    """An async handler over BYTES: upper-cases strings."""

    batchable = False

    async def load(self) -> None:
        self.ready = True

    async def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        (x,) = inputs.values()
        return np.array([s.upper() for s in x.reshape(-1)], dtype=object).reshape(x.shape)


class CannotLoad:
    def load(self) -> None:
        raise FileNotFoundError("weights.bin is missing from the model directory")

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise AssertionError("never reached")


class KilledWhileLoading:
    """Dies by SIGKILL in load(), as the kernel's OOM killer ends a process (a stand-in for it: the
    real one is exercised on the real node, tests/realnode/test_model_storage.py)."""

    def load(self) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise AssertionError("never reached")


class TorchProbe:
    """Reports what the worker's environment looked like when torch was imported."""

    def load(self) -> None:
        import torch

        self.threads = torch.get_num_threads()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (x,) = inputs.values()
        rows = x.shape[0]
        return {
            "threads": np.full((rows, 1), self.threads, dtype=np.int64),
            "omp": np.full((rows, 1), int(os.environ.get("OMP_NUM_THREADS", "0")), dtype=np.int64),
            "cuda_visible": np.array([os.environ.get("CUDA_VISIBLE_DEVICES", "unset")] * rows, dtype=object),
        }


class GpuHog:
    """Allocates as many GiB of GPU memory as its input asks: shows the per-worker memory cap."""

    def load(self) -> None:
        import torch

        self.torch = torch

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        (gib,) = inputs.values()
        block = self.torch.empty(int(float(gib.reshape(-1)[0]) * 2**30), dtype=self.torch.uint8, device="cuda")
        del block
        return np.ones((gib.shape[0], 1), dtype=np.float32)


class TritonSimple:
    """Triton's `simple` example model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32, 16 wide);
    its signature comes from the config.pbtxt beside it in the test's model repository."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"] + inputs["INPUT1"], "OUTPUT1": inputs["INPUT0"] - inputs["INPUT1"]}


class TritonSimpleString:
    """Triton's `simple_string`: the same sums on numbers written as strings (BYTES in, BYTES out)."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = inputs["INPUT0"].astype(np.bytes_).astype(np.int64)
        second = inputs["INPUT1"].astype(np.bytes_).astype(np.int64)
        as_bytes = np.vectorize(lambda value: str(value).encode(), otypes=[object])
        return {"OUTPUT0": as_bytes(first + second), "OUTPUT1": as_bytes(first - second)}


class ParameterEcho:
    """Answers with the request's parameters and each input's, as JSON text: proves they reach a handler."""

    batchable = False

    def predict(self, inputs: dict[str, np.ndarray], parameters: dict, tensor_parameters: dict) -> np.ndarray:
        import json

        return np.array([json.dumps({"request": parameters, "inputs": tensor_parameters}, sort_keys=True).encode()],
                        dtype=object)
