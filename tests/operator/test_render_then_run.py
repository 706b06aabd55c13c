"""Render then run: the container the operator renders for the CPU example, started as it is, serves.

The rendered command runs unchanged (``forkless-runtime serve`` from this virtualenv's bin),
with exactly the rendered ``FORKLESS_*`` variables; only the model URI (a local file instead of
one baked into the image) and the listen address (a free loopback port) are changed. The real
pods of tests/realnode run the same container from the built image; tests/operator/
test_contract.py holds every rendered variable to the runtime's settings table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from forkless_operator.render import RUNTIME_CONTAINER, render_deployment
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService

from tests.runtime.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(directory)], check=True,
                   capture_output=True, timeout=300)
    return directory


def rendered_container(model: Path) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples" / "mlp-cpu.yaml").read_text())
    body["metadata"].update(namespace="default", uid="uid-1", generation=1)
    body["spec"]["model"]["uri"] = model.as_uri()
    deployment = render_deployment(InferenceService.model_validate(body), Settings())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == RUNTIME_CONTAINER
    return dict(container)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    answer = httpx.request(method, url, json=body, timeout=10)
    return answer.status_code, answer.json() if answer.content else {}


@pytest.fixture
def served(models: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    container = rendered_container(models / "mlp.pt")
    env = {e["name"]: e["value"] for e in container["env"]}
    port = free_port()
    env.update(FORKLESS_HOST="127.0.0.1", FORKLESS_PORT=str(port), FORKLESS_GRPC_PORT=str(free_port()))
    # Nothing of this environment leaks in but PATH (to find the command, as the image's PATH does) and HOME.
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": os.environ.get("HOME", "/tmp")}
    process = subprocess.Popen(container["command"], env={**base, **env}, cwd=models)
    try:
        yield process, f"http://127.0.0.1:{port}", env["FORKLESS_MODEL_NAME"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_rendered_container_serves_and_stops_cleanly(
    served: tuple[subprocess.Popen[bytes], str, str], models: Path
) -> None:
    process, base, model = served
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:  # every worker the rendered FORKLESS_WORKERS asks for, not just the first
        try:
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            if sum(1 for line in metrics.splitlines() if line.startswith("forkless_worker_up{") and line.endswith(" 1")) == 2:
                break
        except httpx.TransportError:
            pass  # not listening yet
        assert process.poll() is None, f"forkless-runtime exited {process.returncode} before it was ready"
        assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S}s"
        time.sleep(0.2)

    import torch

    row = [0.1 * i for i in range(16)]
    request = {"inputs": [{"name": "input-0", "shape": [1, 16], "datatype": "FP32", "data": row}]}
    status, answer = http("POST", f"{base}/v2/models/{model}/infer", request)
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["shape"] == [1, 3]
    expected = torch.jit.load(str(models / "mlp.pt")).forward(torch.tensor([row])).flatten().tolist()
    assert output["data"] == pytest.approx(expected, rel=1e-5, abs=1e-6)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
