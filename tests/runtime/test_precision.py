"""Reduced precision and the warm-up, on real `forkless-runtime serve` processes.

Tolerances are the measured errors of notes/planning-precision.md: int8 dynamic quantization reached
about 2.5 % of the largest output, bf16 about 0.4 %.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from forkless_runtime.precision import (
    cpu_bf16_flags,
    cpu_supports_bf16,
    int8_needs_reduced_range,
    precision_problem,
)

from .conftest import CLI, v2_body

ROWS = np.linspace(-2, 2, 4 * 16, dtype=np.float32).reshape(4, 16)


def reference(path: Path, rows: np.ndarray) -> np.ndarray:
    import torch

    return torch.jit.load(str(path))(torch.from_numpy(rows)).detach().numpy()


def outputs(server, rows: np.ndarray, name: str = "input-0") -> tuple[np.ndarray, str]:
    response = server.client.post("/v2/models/m/infer", json=v2_body(rows, name))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"]), output["datatype"]


def parameters(server) -> dict:
    return server.client.get("/v2/models/m").json()["parameters"]


def refused_at_start(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "serve", "--model-name", "m", "--port", "0", *args], capture_output=True, text=True,
                          timeout=120)


# --- which precision runs where, decided without torch ------------------------------------------------


def test_bf16_support_is_read_from_the_cpu_flags() -> None:
    assert cpu_bf16_flags("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n") == ["avx512_bf16"]
    assert cpu_bf16_flags("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n") == []
    assert cpu_bf16_flags("Features\t: fp asimd bf16 i8mm\n") == ["bf16"]


def test_int8_weights_lose_a_bit_on_x86_cpus_without_vnni() -> None:
    assert int8_needs_reduced_range("flags\t\t: fpu avx2 avx512f\n")
    assert not int8_needs_reduced_range("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not int8_needs_reduced_range("Features\t: fp asimd dotprod\n")


@pytest.mark.parametrize(("precision", "device", "fmt", "bf16_cpu", "reason"), [
    ("fp32", "cpu", "onnx", False, None),
    ("fp16", "cpu", "torchscript", True, "needs a GPU"),
    ("fp16", "cuda", "torchscript", False, None),
    ("bf16", "cpu", "torchscript", False, "avx512_bf16"),
    ("bf16", "cpu", "torch-export", True, None),
    ("bf16", "cuda", "onnx", True, "convert the model offline"),
    ("int8", "cuda", "torchscript", True, "CPUs only"),
    ("int8", "cpu", "torch-export", False, "quantize before export"),
    ("int8", "cpu", "python", False, "handler's load()"),
    ("int8", "cpu", "onnx", False, None),
])
def test_each_refusal_names_its_reason(precision: str, device: str, fmt: str, bf16_cpu: bool,
                                       reason: str | None) -> None:
    problem = precision_problem(precision, device, fmt, bf16_cpu)
    assert (problem is None) if reason is None else (reason in problem), problem


@pytest.mark.parametrize(("args", "reason"), [
    (("--precision", "fp16"), "fp16 needs a GPU"),
    (("--precision", "int8", "--format", "torch-export"), "quantize before export"),
])
def test_a_precision_that_cannot_run_here_stops_the_server_with_the_reason(models: Path, args: tuple[str, ...],
                                                                           reason: str) -> None:
    model = models / ("mlp.pt2" if "torch-export" in args else "mlp.pt")
    result = refused_at_start("--model-uri", str(model), "--device", "cpu", *args)
    assert result.returncode == 1
    assert reason in result.stderr, result.stderr[-2000:]
    assert "worker 0 ready" not in result.stderr  # refused before any worker was spawned


def test_the_precision_flag_takes_only_the_runtimes_choices() -> None:
    result = refused_at_start("--model-uri", "m.pt", "--precision", "fp8")
    assert result.returncode == 2 and "fp32, fp16, bf16, int8" in result.stderr


# --- int8 ---------------------------------------------------------------------------------------------


def test_int8_torchscript_serves_quantized_within_the_measured_error(serve, models: Path) -> None:
    server = serve("--model-name", "m", "--model-uri", str(models / "mlp.pt"), "--precision", "int8")
    got, datatype = outputs(server, ROWS)
    want = reference(models / "mlp.pt", ROWS)
    assert datatype == "FP32"  # the client's datatype, whatever the model computes in
    error = np.abs(got - want).max()
    assert 0 < error <= 0.025 * np.abs(want).max() + 1e-3, error  # changed (quantized), and close
    info = parameters(server)
    assert info["precision"] == "int8"
    assert "int8: 2 Linear layer(s) dynamically quantized" in info["notes"]


def test_int8_onnx_serves_the_quantized_graph(serve, models: Path) -> None:
    server = serve("--model-name", "m", "--model-uri", str(models / "linear.onnx"), "--precision", "int8")
    rows = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    got, _ = outputs(server, rows, "features")
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    want = rows @ weight + np.array([1.0, -1.0, 0.5], dtype=np.float32)
    assert np.abs(got - want).max() <= 0.025 * np.abs(want).max()
    info = parameters(server)
    assert info["precision"] == "int8" and any(n.startswith("int8: onnxruntime dynamic quantization") for n in info["notes"])


def test_int8_on_a_model_with_nothing_to_quantize_fails_loudly(tmp_path: Path) -> None:
    """torch's quantizers return such a model unchanged without a word; serving it as int8 would lie."""
    script = (
        "import torch, sys\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()\n"
        "torch.jit.trace(m, torch.zeros(1, 3, 8, 8)).save(sys.argv[1])\n"
    )
    model = tmp_path / "convs.pt"
    subprocess.run([sys.executable, "-c", script, str(model)], check=True, capture_output=True)
    result = refused_at_start("--model-uri", str(model), "--precision", "int8", "--max-load-attempts", "1")
    assert result.returncode == 1
    assert "found nothing to quantize" in result.stderr and "has none" in result.stderr, result.stderr[-2000:]


# --- bf16 -----------------------------------------------------------------------------------------------


def test_bf16_serves_on_a_cpu_with_bf16_instructions_and_is_refused_on_one_without(serve, models: Path) -> None:
    args = ("--model-name", "m", "--model-uri", str(models / "mlp.pt"), "--precision", "bf16", "--device", "cpu")
    if not cpu_supports_bf16():
        result = refused_at_start(*args[2:])
        assert result.returncode == 1 and "avx512_bf16" in result.stderr, result.stderr[-2000:]
        return
    server = serve(*args)
    got, datatype = outputs(server, ROWS)
    want = reference(models / "mlp.pt", ROWS)
    assert datatype == "FP32"
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max() + 1e-3
    assert parameters(server)["precision"] == "bf16"


# --- the warm-up ----------------------------------------------------------------------------------------


def test_the_warm_up_runs_the_largest_batch_and_reports_its_memory(serve, models: Path) -> None:
    server = serve("--model-name", "m", "--model-uri", str(models / "cnn.pt"), "--input-shapes", "3x64x64",
                   "--max-batch-size", "16")
    warm_up = parameters(server)["warm_up"]
    assert warm_up["batch"] == 16 and warm_up["device"] == "cpu"
    # 16 x 32 x 64 x 64 fp32 is 8 MiB for the first activation alone: the forward's growth shows it.
    assert warm_up["activation_bytes"] >= 8 * 2**20, warm_up
    assert warm_up["peak_bytes"] > warm_up["activation_bytes"]
    assert server.metric("forkless_worker_peak_memory_bytes") == warm_up["peak_bytes"]
    assert "warm-up: a batch of 16" in server.log()


def test_a_torch_export_model_is_warmed_up_from_its_own_shapes(serve, models: Path) -> None:
    server = serve("--model-name", "m", "--model-uri", str(models / "mlp.pt2"), "--max-batch-size", "8")
    assert parameters(server)["warm_up"]["batch"] == 8


def test_without_input_shapes_a_torchscript_model_says_why_it_was_not_warmed_up(serve, models: Path) -> None:
    server = serve("--model-name", "m", "--model-uri", str(models / "mlp.pt"))
    assert "--input-shapes" in parameters(server)["warm_up"]["skipped"]
    outputs(server, ROWS)  # and serves all the same


def test_input_shapes_that_do_not_parse_are_a_usage_error() -> None:
    result = refused_at_start("--model-uri", "m.pt", "--input-shapes", "3x-1")
    assert result.returncode == 2 and "must be positive sizes joined by x" in result.stderr


def test_a_peak_over_the_budget_is_refused_with_both_numbers_and_what_to_change() -> None:
    """The GPU refusal's wording, decided by a pure function (the GPU path itself runs in test_gpu.py)."""
    from forkless_runtime.termination import MODEL_OUT_OF_MEMORY, load_failure_reason
    from forkless_runtime.worker.warmup import WarmUp, budget_problem

    GiB = 2**30
    fits = WarmUp(batch=64, seconds=0.1, peak_bytes=9 * GiB, activation_bytes=6 * GiB, device="cuda")
    assert budget_problem(fits, 10 * GiB, "10.00 GiB (gpuMemoryFraction 0.125 of 80.0 GiB)") is None
    over = WarmUp(batch=256, seconds=0.4, peak_bytes=int(11.8 * GiB), activation_bytes=int(10.9 * GiB), device="cuda")
    problem = budget_problem(over, 10 * GiB, "10.00 GiB (gpuMemoryFraction 0.125 of 80.0 GiB)")
    assert problem is not None
    assert "one batch of 256 peaked at 11.80 GiB" in problem and "budget of 10.00 GiB" in problem
    assert "fewer workers per GPU, a smaller maxBatchSize, a lower precision" in problem
    assert load_failure_reason(f"WorkerDoesNotFit: {problem}") == MODEL_OUT_OF_MEMORY  # what the operator shows
