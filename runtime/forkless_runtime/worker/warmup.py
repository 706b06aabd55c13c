"""One warm-up batch at the largest batch size, with its memory peak measured, before a worker says ready.

Without it, the first full batch under traffic is where a worker finds out it does not fit: on a GPU
an out-of-memory error in the middle of serving, on a CPU the kernel's OOM killer. Measured the way
vLLM sizes its KV cache: reset the allocator's peak, run one forward at the largest batch, read the
peak. On CUDA that is the caching allocator's peak reserved memory (what set_per_process_memory_fraction
counts) plus the CUDA context, which sits outside it; on CPU the peak resident set of the process
(the kernel's high-water mark, reset just before).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..gpu_memory import CUDA_CONTEXT_BYTES
from ..protocol.tensors import NamedTensor, dtype_of
from ..settings import format_input_shapes, parse_input_shapes
from .loaders import LoadedModel

GiB = 2**30


class WorkerDoesNotFit(MemoryError):
    """The warm-up's peak exceeds the worker's memory budget: refuse to start, with both numbers."""


@dataclass
class WarmUp:
    batch: int
    seconds: float
    peak_bytes: int  # the worker's peak (CUDA: reserved + context; CPU: resident set)
    activation_bytes: int  # what the forward itself added over the loaded model
    device: str

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "seconds": round(self.seconds, 4), "peak_bytes": self.peak_bytes,
                "activation_bytes": self.activation_bytes, "device": self.device}


def sample_inputs(model: LoadedModel, input_shapes: str | None, batch: int) -> list[NamedTensor] | str:
    """Zeros at ``batch`` rows for every input, or the reason the shapes are unknown."""
    declared = model.inputs
    if input_shapes:
        shapes = parse_input_shapes(input_shapes)
        if declared and len(shapes) != len(declared):
            return (f"--input-shapes gives {len(shapes)} shape(s) ({input_shapes}) for a model with "
                    f"{len(declared)} input(s) ({', '.join(t.name for t in declared)})")
    elif declared and all(len(t.shape) > 1 and all(d > 0 for d in t.shape[1:]) for t in declared):
        shapes = [t.shape[1:] for t in declared]
    else:
        return ("the model declares no input shapes (TorchScript records none): give --input-shapes "
                "(model.inputShapes), e.g. 3x64x64, to warm up and measure it at the largest batch")
    names = [t.name for t in declared] or [f"input-{i}" for i in range(len(shapes))]
    datatypes = [t.datatype for t in declared] or [""] * len(shapes)
    return [NamedTensor(name, np.zeros((batch, *shape), dtype=dtype_of(datatype or "FP32")))
            for name, shape, datatype in zip(names, shapes, datatypes, strict=True)]


def describe_shapes(tensors: list[NamedTensor]) -> str:
    return format_input_shapes([list(t.array.shape[1:]) for t in tensors])


_STATUS_KB = re.compile(r"^(\w+):\s+(\d+) kB", re.MULTILINE)


def _status_bytes(field: str) -> int:
    values = dict(_STATUS_KB.findall(Path("/proc/self/status").read_text()))
    return int(values[field]) * 1024


def resident_bytes() -> int | None:
    """This process's resident set now (None where /proc is not Linux's)."""
    try:
        return _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak resident set (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(model: LoadedModel, tensors: list[NamedTensor], device: str) -> WarmUp:
    batch = len(tensors[0].array) if tensors else 1
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_reserved()
        started = time.perf_counter()
        model.predict(tensors)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak_reserved = torch.cuda.max_memory_reserved()
        return WarmUp(batch, seconds, peak_reserved + CUDA_CONTEXT_BYTES, max(0, peak_reserved - loaded), device)
    before = _status_bytes("VmRSS")
    reset = _reset_cpu_peak()
    started = time.perf_counter()
    model.predict(tensors)
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM") if reset else max(_status_bytes("VmRSS"), before)
    return WarmUp(batch, seconds, peak, max(0, peak - before), device)


def budget_problem(warm_up: WarmUp, budget_bytes: int, budget_text: str) -> str | None:
    """The refusal when the measured peak does not fit the budget, with both numbers and what to change."""
    if warm_up.peak_bytes <= budget_bytes:
        return None
    return (f"the worker would run out of memory: one batch of {warm_up.batch} peaked at "
            f"{warm_up.peak_bytes / GiB:.2f} GiB ({warm_up.activation_bytes / GiB:.2f} GiB of it the forward's "
            f"activations), over its budget of {budget_text}; use fewer workers per GPU, a smaller maxBatchSize, "
            "a lower precision (fp16 or bf16), or a larger gpuMemoryFraction")


def gpu_budget(fraction: float | None, workers_on_gpu: int) -> tuple[int, str]:
    """This worker's share of its GPU: the fraction it is capped at, else an equal share."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    share = fraction if fraction is not None else 1 / max(1, workers_on_gpu)
    how = f"gpuMemoryFraction {fraction:g}" if fraction is not None else f"1/{workers_on_gpu} for {workers_on_gpu} workers"
    return int(share * total), f"{share * total / GiB:.2f} GiB ({how} of {total / GiB:.1f} GiB)"


def warm_up(model: LoadedModel, input_shapes: str | None, max_batch_size: int, device: str,
            gpu_memory_fraction: float | None = None, workers_on_gpu: int = 1) -> WarmUp | str:
    """Run the warm-up and check the budget (on a GPU); the reason it cannot run when shapes are unknown.

    Raises WorkerDoesNotFit when the peak does not fit: a CUDA out-of-memory error during the
    warm-up (the allocator's cap enforced) is the same refusal, with the numbers it has.
    """
    if model.platform == "kserve":
        return "a KServe model takes KServe's payloads, which cannot be made up from shapes: no warm-up batch"
    batch = max_batch_size if model.batchable else 1
    tensors = sample_inputs(model, input_shapes, batch)
    if isinstance(tensors, str):
        return tensors
    if device == "cuda" and "torch" not in sys.modules:  # onnxruntime: measuring through torch would add a context
        model.predict(tensors)
        return ("the warm-up batch ran; its GPU memory was not measured: onnxruntime allocates outside "
                "PyTorch's allocator, and reading the device through torch would cost this worker a second context")
    try:
        result = measure(model, tensors, device)
    except MemoryError:
        raise
    except Exception as exc:
        if device == "cuda" and "out of memory" in str(exc).lower():
            _, text = gpu_budget(gpu_memory_fraction, workers_on_gpu)
            raise WorkerDoesNotFit(
                f"the worker ran out of memory in its warm-up batch of {batch} ({describe_shapes(tensors)} each), "
                f"over its budget of {text}; use fewer workers per GPU, a smaller maxBatchSize, or a lower "
                f"precision: {str(exc).splitlines()[0]}"
            ) from exc
        # Zeros may not be valid input for every model (a handler that parses text): not a reason to refuse.
        return f"the warm-up batch failed, so nothing was measured: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if device == "cuda":
        budget, text = gpu_budget(gpu_memory_fraction, workers_on_gpu)
        problem = budget_problem(result, budget, text)
        if problem:
            raise WorkerDoesNotFit(problem)
    return result
