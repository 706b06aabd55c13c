"""Fixtures for the runtime: example models on disk and real `forkless-runtime serve` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CLI = str(Path(sys.executable).parent / "forkless-runtime")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models (TorchScript MLP and CNN, torch.export MLP) plus an ONNX linear model."""
    directory = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(directory)], check=True,
                   capture_output=True)
    write_onnx_linear(directory / "linear.onnx")
    return directory


def write_onnx_linear(path: Path) -> None:
    """y = x @ W + b with a symbolic batch dimension, built with onnx.helper (no exporter needed)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    bias = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["scores"])],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    client: httpx.Client = field(init=False)
    grpc_port: int = 0

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self, ready_only: bool = True) -> dict[int, int]:
        """{worker slot: pid}, as the server's own forkless_worker_up metric reports them."""
        pids = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith("forkless_worker_up{"):
                labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
                if not ready_only or line.endswith(" 1"):
                    pids[int(labels["worker"].strip('"'))] = int(labels["pid"].strip('"'))
        return pids

    def wait_ready(self, timeout: float = 120, workers: int = 1) -> None:
        """Ready, and ``workers`` workers loaded: readiness alone turns true with the first worker, and a
        test about two workers must not start while the second still loads."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if self.client.get("/v2/health/ready").status_code == 200 and len(self.worker_pids()) >= workers:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready with {workers} worker(s) within {timeout}s:\n{self.log()[-4000:]}")

    def metric(self, name: str) -> float:
        """Sum of every sample of a metric (over its labels)."""
        total = 0.0
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        return self.process.returncode


def expected_workers(args: tuple[str, ...], env: dict[str, str]) -> str:
    """The worker count a `serve` command line asks for: --workers N, --workers=N, else FORKLESS_WORKERS, else 1."""
    for index, arg in enumerate(args):
        if arg == "--workers":
            return args[index + 1]
        if arg.startswith("--workers="):
            return arg.split("=", 1)[1]
    return env.get("FORKLESS_WORKERS", "1")


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True,
                 command: list[str] | None = None) -> Server:
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    # The test handlers' directory, then whatever the caller's path holds (a checkout under test).
    python_path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    grpc_port = 0
    if "--grpc-port" not in args and "FORKLESS_GRPC_PORT" not in (env or {}):
        grpc_port = free_port()  # several servers run at once: none may take the default 8081
        args = ("--grpc-port", str(grpc_port), *args)
    argv = [*(command or [CLI]), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=True)
    server = Server(process, port, log_path)
    server.grpc_port = grpc_port
    if wait:
        wanted = expected_workers(args, full_env)
        server.wait_ready(workers=1 if wanted == "auto" else int(wanted))
    return server


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start `forkless-runtime serve ARGS...` on a free port; every server is stopped after the test."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True,
              command: list[str] | None = None) -> Server:
        server = start_server(tmp_path, *args, env=env, wait=wait, command=command)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)  # nothing of it may outlive the test


def v2_body(array, name: str = "input-0", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                        "data": array.reshape(-1).tolist()}]}
