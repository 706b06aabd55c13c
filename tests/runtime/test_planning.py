"""`forkless-runtime plan`: counted and traced on the CPU, then held against what a real worker uses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from forkless_runtime.planning import CUDA_CONTEXT_BYTES, GPUS, fit, parse_memory, precision_parameter_bytes

from .conftest import CLI

GiB = 2**30
# The example MLP: Linear(16, 64) and Linear(64, 3).
MLP_WEIGHTS, MLP_BIASES = 16 * 64 + 64 * 3, 64 + 3


def plan(*args: str) -> dict:
    result = subprocess.run([CLI, "plan", "--output", "json", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_memory_sizes_parse_with_their_units() -> None:
    assert parse_memory("80GiB") == 80 * GiB
    assert parse_memory("81559MiB") == 81559 * 2**20
    assert parse_memory("40G") == 40 * 10**9
    with pytest.raises(ValueError, match="80GiB"):
        parse_memory("lots")


def test_workers_fit_in_ninety_percent_of_the_gpu_each_capped_at_its_need() -> None:
    workers, fraction = fit(10 * GiB, 80 * GiB)
    assert workers == 7  # 0.9 x 80 / 10 = 7.2
    assert fraction == pytest.approx(0.12)  # (10 GiB - the context) / 80 GiB = 0.119, rounded up
    assert fit(100 * GiB, GPUS["h100-80gb"])[0] == 0


def test_reduced_precision_shrinks_what_it_casts() -> None:
    tensors = [(1000, 4, True), (10, 4, False)]
    assert precision_parameter_bytes(tensors, "fp32") == 4040
    assert precision_parameter_bytes(tensors, "bf16") == 2020
    assert precision_parameter_bytes(tensors, "int8") == 1040  # Linear weights in one byte, the rest fp32


def test_torch_export_parameters_are_counted_exactly_in_each_precision(models: Path) -> None:
    fp32 = plan("--model-uri", str(models / "mlp.pt2"), "--max-batch-size", "8")
    assert fp32["parameter_bytes"] == 4 * (MLP_WEIGHTS + MLP_BIASES)
    assert fp32["input_shapes"] == [[16]]  # read from the program
    assert fp32["activation_bytes_per_sample"] >= 4 * 64  # at least the hidden layer
    assert plan("--model-uri", str(models / "mlp.pt2"), "--precision", "bf16")["parameter_bytes"] == fp32["parameter_bytes"] // 2
    int8 = plan("--model-uri", str(models / "mlp.pt"), "--input-shapes", "16", "--precision", "int8")
    assert int8["parameter_bytes"] == MLP_WEIGHTS + 4 * MLP_BIASES


def test_onnx_activations_follow_the_liveness_of_the_graph(models: Path) -> None:
    """linear.onnx: features[b,4] -> MatMul -> xw[b,3] -> Add -> scores[b,3]. The peak is during the
    MatMul, with its input and output alive: 16 + 12 bytes per sample."""
    result = plan("--model-uri", str(models / "linear.onnx"), "--max-batch-size", "64")
    assert result["parameter_bytes"] == 4 * (12 + 3)
    assert result["activation_bytes_per_sample"] == 28
    assert result["activation_bytes_at_max_batch"] == 28 * 64


def test_the_gpu_table_says_how_many_workers_fit(models: Path) -> None:
    result = plan("--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64", "--max-batch-size", "256",
                  "--gpu", "l4")
    assert result["gpu_memory_bytes"] == GPUS["l4"]
    assert result["worker_bytes"] > CUDA_CONTEXT_BYTES + result["parameter_bytes"] + result["activation_bytes_at_max_batch"]
    assert (result["workers_that_fit"], result["memory_fraction_each"]) == fit(result["worker_bytes"], GPUS["l4"])
    text = subprocess.run([CLI, "plan", "--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64",
                           "--gpu-memory", "1GiB"], capture_output=True, text=True, timeout=300).stdout
    assert "worker(s) fit" in text or "not even one worker fits" in text


def test_a_torchscript_model_without_shapes_is_refused_with_what_to_give(models: Path) -> None:
    result = subprocess.run([CLI, "plan", "--model-uri", str(models / "cnn.pt")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "give --input-shapes" in result.stderr


def test_the_plan_agrees_with_what_a_real_worker_measures(serve, models: Path) -> None:
    """The traced activations against the warm-up's measured growth of a real worker at the same batch:
    the real peak is larger (allocator, oneDNN scratch), by the ACTIVATION_FACTOR the plan reserves."""
    planned = plan("--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64", "--max-batch-size", "32")
    server = serve("--model-name", "m", "--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64",
                   "--max-batch-size", "32", "--threads-per-worker", "1")
    measured = server.client.get("/v2/models/m").json()["parameters"]["warm_up"]["activation_bytes"]
    ratio = measured / planned["activation_bytes_at_max_batch"]
    print(f"cnn at batch 32: planned {planned['activation_bytes_at_max_batch']} B, measured {measured} B, ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 2.5, ratio


def test_a_python_handler_is_planned_from_what_it_declares() -> None:
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([CLI, "plan", "--handler", "handlers:Doubler", "--max-batch-size", "10", "--output", "json"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    declared = json.loads(result.stdout)
    assert (declared["parameter_bytes"], declared["activation_bytes_at_max_batch"]) == (1000, 640)
    silent = subprocess.run([CLI, "plan", "--handler", "handlers:AsyncUpper"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert silent.returncode == 1 and "declares no memory" in silent.stderr
