"""engine: ray for real: a local Ray cluster (`ray start --head`, as KubeRay starts it) is given the serveConfigV2
the operator renders, through Serve's REST API (`serve deploy`, the same PUT KubeRay makes), and its replicas
answer V1 and V2 with forkless-runtime's loaders and codecs. Ray Serve 2.60 comes from `make ray-env`.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from forkless_operator.reconcile import parse
from forkless_operator.render_ray import serve_config

from .conftest import ROOT, free_port, v2_body

RAY_ENV = ROOT / ".venv-ray"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not RAY_ENV.exists(), reason="make ray-env installs Ray Serve beside the venv")]
RAY_CLI = "from ray.scripts.scripts import main; main()"
SERVE_CLI = "from ray.serve.scripts import cli; cli()"


class LocalRay:
    """A one-node Ray cluster in a temporary directory, stopped (with every Ray process) at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dashboard_port = free_port()
        self.http_port = free_port()  # Serve's HTTP options cannot change while it runs: one port for every deploy
        self.env = {**os.environ, "PYTHONPATH": str(RAY_ENV), "HOME": str(tmp), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "disabled"}
        # Ray's socket paths must stay short: a short temp dir of its own.
        self.temp_dir = Path(f"/tmp/ray-{os.getpid()}-{free_port()}")

    def ray(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", RAY_CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def start(self) -> None:
        self.ray("start", "--head", "--num-cpus=2", "--num-gpus=0", f"--port={free_port()}",
                 f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                 f"--temp-dir={self.temp_dir}", "--disable-usage-stats")

    def deploy(self, config: dict[str, Any]) -> None:
        path = self.tmp / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([sys.executable, "-c", SERVE_CLI, "deploy", str(path), "--address",
                        f"http://127.0.0.1:{self.dashboard_port}"], env=self.env, capture_output=True, text=True,
                       timeout=120, check=True)

    def applications(self) -> dict[str, Any]:
        answer = httpx.get(f"http://127.0.0.1:{self.dashboard_port}/api/serve/applications/", timeout=10)
        answer.raise_for_status()
        return answer.json().get("applications") or {}

    def wait_for_app(self, name: str, wanted: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        app: dict[str, Any] = {}
        while time.monotonic() < deadline:
            app = self.applications().get(name) or {}
            if app.get("status") == wanted:
                return app
            time.sleep(1)
        raise AssertionError(f"application {name} is {app.get('status')} after {timeout} s, not {wanted}: "
                             f"{app.get('message')}")

    def stop(self) -> None:
        self.ray("stop", "--force", check=False, timeout=60)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRay]:
    ray = LocalRay(tmp_path_factory.mktemp("ray"))
    try:
        ray.start()
        yield ray
    finally:
        ray.stop()


def rendered_config(model_path: Path, http_port: int, **spec_fields: Any) -> dict[str, Any]:
    """What the operator renders into serveConfigV2 for an engine ray InferenceService of this model."""
    body = {"engine": "ray", "model": {"name": "mlp", "uri": f"file://{model_path}", "signature": {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}]}},
        "runtime": {"workers": 2, "batching": {"maxBatchSize": 16, "maxDelayMs": 5}}, **spec_fields}
    config = serve_config(parse({"metadata": {"name": "mlp", "namespace": "t"}, "spec": body}))
    config["http_options"]["port"] = http_port
    config["http_options"]["host"] = "127.0.0.1"
    return config


def reference(model_path: Path, x: np.ndarray) -> np.ndarray:
    import torch

    return torch.jit.load(str(model_path))(torch.from_numpy(x)).detach().numpy()


def test_the_rendered_app_serves_v1_and_v2_with_the_runtimes_loaders_and_errors(local_ray: LocalRay, models: Path) -> None:
    port = local_ray.http_port
    local_ray.deploy(rendered_config(models / "mlp.pt", port))
    app = local_ray.wait_for_app("mlp", "RUNNING")
    assert app["deployments"]["ForklessModel"]["status"] == "HEALTHY"
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    answer = client.post("/v2/models/mlp/infer", json=v2_body(x, name="x"))
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["name"] == "scores" and output["shape"] == [3, 3]
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, 3), reference(models / "mlp.pt", x), rtol=1e-5)

    v1 = client.post("/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(np.array(v1.json()["predictions"]), reference(models / "mlp.pt", x), rtol=1e-5)

    metadata = client.get("/v2/models/mlp").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert metadata["parameters"]["engine"] == "ray"

    wrong = client.post("/v2/models/mlp/infer", json=v2_body(np.ones((1, 8), dtype=np.float32), name="x"))
    assert wrong.status_code == 400 and "input 'x'" in wrong.json()["error"] and "[-1, 16]" in wrong.json()["error"]
    unknown = client.post("/v2/models/other/infer", json=v2_body(x, name="x"))
    assert unknown.status_code == 404 and "Request for unknown model: 'other'" in unknown.json()["error"]
    malformed = client.post("/v2/models/mlp/infer", content=b"{not json")
    assert malformed.status_code == 400

    # Concurrent requests are batched by Serve's batcher and each gets its own rows back; 40 rows, more than a
    # batch of 16, ride alone.
    inputs = [np.full((1 + i % 3, 16), i, dtype=np.float32) for i in range(48)] + [np.ones((40, 16), np.float32)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda a: client.post("/v2/models/mlp/infer", json=v2_body(a, name="x")), inputs))
    for sent, got in zip(inputs, answers, strict=True):
        assert got.status_code == 200, got.text
        data = np.array(got.json()["outputs"][0]["data"]).reshape(len(sent), 3)
        np.testing.assert_allclose(data, reference(models / "mlp.pt", sent), rtol=1e-5, atol=1e-6)


def test_a_handler_that_cannot_be_imported_fails_the_deploy_with_its_reason(local_ray: LocalRay, models: Path) -> None:
    """After runtime.maxLoadAttempts replica starts (3), not Serve's 20: DEPLOY_FAILED, with the import error."""
    config = rendered_config(models / "mlp.pt", local_ray.http_port)
    app = config["applications"][0]
    app["args"]["settings"].update({"format": "python", "handler": "no_such_module:Model"})
    app["args"]["settings"].pop("signature")
    local_ray.deploy(config)  # replaces the working application: Serve's config is declarative
    failed = local_ray.wait_for_app("mlp", "DEPLOY_FAILED", timeout=120)
    deployment = failed["deployments"]["ForklessModel"]
    assert deployment["status"] == "DEPLOY_FAILED"
    assert "failed to start 3 times" in deployment["message"] and "no_such_module" in deployment["message"]
