"""The CUDA path, on a real GPU (the device machine); skipped where no GPU is visible.

Counts GPUs the way the front-end does (CUDA_VISIBLE_DEVICES, /proc/driver/nvidia), so this
module itself never initialises CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from forkless_runtime.pool.resources import visible_gpus

from .conftest import CLI, v2_body
from .test_fork_hazard import run_pattern

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not visible_gpus(), reason="needs a CUDA GPU")]


def compute_apps() -> dict[int, int]:
    """{pid: MiB} of processes holding a CUDA context, from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    apps = {}
    for line in out.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        apps[int(pid)] = int(used)
    return apps


def test_the_fork_pattern_dies_on_cuda_while_spawned_children_run():
    children = run_pattern("fork", device="cuda")
    assert all("Cannot re-initialize CUDA in forked subprocess" in child for child in children), children
    assert run_pattern("spawn", device="cuda") == ["ok", "ok"]


def test_four_workers_share_one_gpu_each_with_its_own_context_and_the_front_end_none(serve, models):
    server = serve("--model-name", "cnn", "--model-uri", str(models / "cnn.pt"), "--workers", "4",
                   "--device", "cuda", "--gpu-memory-fraction", "0.2", env={"CUDA_VISIBLE_DEVICES": "0"})
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    for _ in range(8):
        assert server.client.post("/v2/models/cnn/infer", json=v2_body(x)).status_code == 200
    pids = server.worker_pids()
    assert len(pids) == 4
    apps = compute_apps()
    assert set(pids.values()) <= set(apps), (pids, apps)
    assert server.process.pid not in apps
    assert server.metric("forkless_worker_gpu_memory_bytes") > 0


def test_the_per_worker_memory_fraction_is_enforced(serve):
    server = serve("--model-name", "hog", "--format", "python", "--handler", "handlers:GpuHog", "--workers", "2",
                   "--device", "cuda", "--gpu-memory-fraction", "0.05", env={"CUDA_VISIBLE_DEVICES": "0"})
    pids = server.worker_pids()
    small = server.client.post("/v2/models/hog/infer", json=v2_body(np.array([[0.5]], np.float32)))
    assert small.status_code == 200
    huge = server.client.post("/v2/models/hog/infer", json=v2_body(np.array([[40.0]], np.float32)))
    assert huge.status_code == 500 and "out of memory" in huge.json()["error"].lower()
    assert server.worker_pids() == pids  # an OOM inside predict is an error, not a crash


def test_the_warm_up_measures_each_workers_peak_on_the_gpu_and_plan_is_held_against_it(serve, models):
    """The CUDA context and the allocator's peak, per worker, for 1 and 2 workers on one GPU."""
    planned = json.loads(subprocess.run(
        [CLI, "plan", "--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64", "--max-batch-size", "64",
         "--output", "json"], capture_output=True, text=True, check=True).stdout)
    for workers in (1, 2):
        server = serve("--model-name", "cnn", "--model-uri", str(models / "cnn.pt"), "--workers", str(workers),
                       "--device", "cuda", "--input-shapes", "3x64x64", "--max-batch-size", "64",
                       env={"CUDA_VISIBLE_DEVICES": "0"})
        warm_up = server.client.get("/v2/models/cnn").json()["parameters"]["warm_up"]
        apps = compute_apps()
        used = [apps[pid] * 2**20 for pid in server.worker_pids().values()]
        print(f"{workers} worker(s): planned {planned['worker_bytes']} B, warm-up peak {warm_up['peak_bytes']} B, "
              f"nvidia-smi per worker {used}")
        assert warm_up["batch"] == 64 and warm_up["device"] == "cuda"
        assert warm_up["activation_bytes"] > 0
        server.stop()


def test_a_worker_over_its_gpu_budget_is_refused_with_the_numbers(models):
    result = subprocess.run(
        [CLI, "serve", "--model-name", "cnn", "--model-uri", str(models / "cnn.pt"), "--device", "cuda",
         "--input-shapes", "3x64x64", "--max-batch-size", "4096", "--gpu-memory-fraction", "0.01",
         "--max-load-attempts", "1", "--port", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert result.returncode == 1
    assert "out of memory" in result.stderr and "gpuMemoryFraction 0.01" in result.stderr, result.stderr[-3000:]


def test_fp16_serves_on_the_gpu_in_the_clients_datatype(serve, models):
    import torch

    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--device", "cuda",
                   "--precision", "fp16", env={"CUDA_VISIBLE_DEVICES": "0"})
    rows = np.linspace(-2, 2, 64, dtype=np.float32).reshape(4, 16)
    response = server.client.post("/v2/models/mlp/infer", json=v2_body(rows))
    assert response.status_code == 200
    (output,) = response.json()["outputs"]
    assert output["datatype"] == "FP32"
    want = torch.jit.load(str(models / "mlp.pt"))(torch.from_numpy(rows)).detach().numpy()
    assert np.abs(np.array(output["data"]).reshape(4, 3) - want).max() <= 1e-2
