"""`--workers auto`: the most workers that fit, from the first worker's measured need."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from forkless_runtime.pool.auto import CUDA_CONTEXT_BYTES, decide, memory_limit_bytes
from forkless_runtime.pool.resources import usable_cpus

from .conftest import v2_body

GiB = 2**30


def test_on_a_gpu_as_many_as_fit_in_ninety_percent_each_capped_at_its_share() -> None:
    decision = decide(10 * GiB, 80 * GiB, cpus=16, gpus=2)
    assert (decision.workers, decision.per_gpu) == (14, 7)  # 0.9 x 80 / 10 = 7.2 per GPU
    share = 0.9 * 80 * GiB / 7
    assert decision.gpu_memory_fraction == pytest.approx((share - CUDA_CONTEXT_BYTES) / (80 * GiB), abs=1e-3)
    assert decision.gpu_memory_fraction * 80 * GiB + CUDA_CONTEXT_BYTES >= 10 * GiB  # its measured need fits
    assert "7 per GPU x 2 GPU(s)" in decision.reason


def test_a_given_fraction_and_the_cpus_bound_the_count() -> None:
    assert decide(1 * GiB, 80 * GiB, cpus=64, gpus=1, gpu_memory_fraction=0.25).workers == 4
    assert decide(1 * GiB, 80 * GiB, cpus=64, gpus=1, gpu_memory_fraction=0.25).gpu_memory_fraction == 0.25
    few_cpus = decide(1 * GiB, 80 * GiB, cpus=8, gpus=2)
    assert (few_cpus.workers, few_cpus.per_gpu) == (8, 4) and "usable CPU" in few_cpus.reason
    assert decide(100 * GiB, 80 * GiB, cpus=8, gpus=1).workers == 1  # never fewer than one


def test_on_a_cpu_one_per_usable_cpu_unless_the_memory_runs_out_first() -> None:
    assert decide(600 * 2**20, 24 * GiB, cpus=2, gpus=0).workers == 2
    by_memory = decide(600 * 2**20, 1 * GiB, cpus=4, gpus=0)
    assert by_memory.workers == 1 and "bounded by the memory" in by_memory.reason
    assert by_memory.gpu_memory_fraction is None


def test_the_memory_limit_is_the_containers_else_the_machines(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:  1 kB\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit_bytes(tmp_path, meminfo) == 24576000 * 1024
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert memory_limit_bytes(tmp_path, meminfo) == GiB


def test_auto_serves_with_one_worker_per_cpu_here_and_loses_no_request_while_it_grows(serve, models: Path) -> None:
    """The first worker measures, the others start, and the first restarts with the final thread
    budget: requests sent all along are all answered."""
    server = serve("--model-name", "m", "--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64",
                   "--workers", "auto", "--max-batch-size", "4")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(server.client.post("/v2/models/m/infer", json=v2_body(x)).status_code)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        deadline = time.monotonic() + 120
        want = min(usable_cpus(), 8)
        while time.monotonic() < deadline:
            info = server.client.get("/v2/models/m").json()["parameters"]
            restarted = "worker 0 restarts" in server.log() or want == 1
            if info["workers"] == want and len(server.worker_pids()) == want and restarted and \
                    server.log().count("worker 0 ready") >= (2 if want > 1 else 1):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(server.log()[-3000:])
    finally:
        stop.set()
        sender.join()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert f"{want} worker(s)" in info["workers_auto"]
    assert all(f"with {1 if want > 1 else usable_cpus()} thread(s)" in line
               for line in server.log().splitlines()[-6:] if "loaded cnn.pt" in line)


def test_workers_takes_a_number_or_auto(models: Path) -> None:
    import subprocess

    from .conftest import CLI

    result = subprocess.run([CLI, "serve", "--model-name", "m", "--model-uri", "m.pt", "--workers", "many"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "must be a number >= 1 or auto" in result.stderr
