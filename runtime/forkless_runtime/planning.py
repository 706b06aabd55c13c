"""`forkless-runtime plan`: how much memory one worker needs, and how many fit on a GPU, computed on a CPU.

Nothing is allocated for real: parameters are counted from the file (TorchScript loads onto the
`meta` device, ONNX initializers are read without their data), and the forward's activations are
traced on meta or fake tensors by a dispatch mode that adds each new storage's bytes and subtracts
them when it is freed, at batch 1 and at the largest batch. On a GPU a worker also holds a CUDA
context and library workspaces outside PyTorch's allocator (CUDA_CONTEXT_BYTES), and the allocator
rounds and caches: the plan reserves ACTIVATION_FACTOR times the traced peak, the factor measured
between traced and real peaks (notes/planning-precision.md: 1.5-2.0x on CPU). The warm-up of every
worker then measures the real figure (forkless_runtime.worker.warmup).

This module imports torch (and onnx for ONNX models): the CLI imports it only for `plan`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .gpu_memory import CUDA_CONTEXT_BYTES, GPU_UTILIZATION
from .settings import parse_input_shapes
from .worker.warmup import GiB

ACTIVATION_FACTOR = 2.0
MiB = 2**20
# Total memory as the driver reports it (nvidia-smi "MiB"); --gpu-memory gives any other figure.
GPUS: dict[str, int] = {
    "h100-80gb": 81559 * MiB,
    "h200": 143771 * MiB,
    "a100-80gb": 81920 * MiB,
    "a100-40gb": 40960 * MiB,
    "l40s": 46068 * MiB,
    "l4": 23034 * MiB,
    "t4": 15360 * MiB,
    "mig-1g.10gb": 9984 * MiB,
    "mig-3g.40gb": 40192 * MiB,
}
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}
ONNX_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


@dataclass
class Plan:
    model: str
    format: str
    precision: str
    max_batch_size: int
    input_shapes: list[list[int]]
    parameter_bytes: int
    activation_bytes_per_sample: int
    activation_bytes_at_max_batch: int
    worker_fixed_bytes: int  # CUDA context and workspaces, outside the allocator
    worker_bytes: int  # what one worker on a GPU is planned to need
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    workers_that_fit: int | None = None
    memory_fraction_each: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_memory(text: str) -> int:
    """``80GiB``, ``81559MiB``, ``80G``, ``85899345920`` -> bytes."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30,
             "ti": 2**40}
    cleaned = text.strip().lower().removesuffix("b")
    number = cleaned.rstrip("kmgti")
    unit = cleaned[len(number):]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise ValueError(f"memory {text!r}: use a number with an optional unit such as 80GiB or 81559MiB") from None


def worker_need(parameter_bytes: int, activations_at_max: int, on_gpu: bool = True) -> int:
    return (CUDA_CONTEXT_BYTES if on_gpu else 0) + parameter_bytes + math.ceil(ACTIVATION_FACTOR * activations_at_max)


def fit(worker_bytes: int, gpu_memory: int) -> tuple[int, float]:
    """How many workers of ``worker_bytes`` fit in GPU_UTILIZATION of ``gpu_memory``, and the memory
    fraction each should be capped at (its need, rounded up to a hundredth; the context is outside the cap)."""
    workers = int(GPU_UTILIZATION * gpu_memory // worker_bytes) if worker_bytes else 0
    fraction = math.ceil(100 * (worker_bytes - CUDA_CONTEXT_BYTES) / gpu_memory) / 100
    return workers, max(0.01, fraction)


def precision_parameter_bytes(tensors: list[tuple[int, int, bool]], precision: str) -> int:
    """Bytes of (elements, element size, is a Linear weight) tensors once served in ``precision``.

    fp16/bf16 halve floating tensors; int8 stores Linear weights in one byte each (dynamic
    quantization), the rest stays fp32.
    """
    total = 0
    for elements, size, linear_weight in tensors:
        if precision in BYTES_PER_ELEMENT and size == 4:
            size = BYTES_PER_ELEMENT[precision]
        elif precision == "int8" and linear_weight:
            size = 1
        total += elements * size
    return total


class PeakTracker(TorchDispatchMode):
    """Adds each new output storage's bytes, subtracts them when the tensor holding it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key = storage._cdata  # the storage's identity, on meta and fake tensors too
            if key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(value, self._free, key)
        self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _traced_peak(call: Any, make_inputs: Any, fake: bool) -> int:
    tracker = PeakTracker()
    with torch.inference_mode():
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True), tracker:
                call(*make_inputs())
        else:
            with tracker:
                call(*make_inputs())
    return int(tracker.peak)


def _torch_inputs(shapes: list[list[int]], batch: int, device: str, dtype: Any) -> Any:
    return lambda: [torch.zeros((batch, *shape), device=device, dtype=dtype) for shape in shapes]


def _torch_plan(path: str, fmt: str, shapes: list[list[int]] | None, precision: str,
                batch: int) -> tuple[list[tuple[int, int, bool]], int, int, list[list[int]]]:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            module = torch.jit.load(path, map_location="meta")
            device, fake = "meta", False
            if shapes is None:
                raise ValueError("a TorchScript file records no input shapes: give --input-shapes, e.g. 3x64x64")
        else:
            from .worker.loaders import no_arbitrary_unpickling

            with no_arbitrary_unpickling():
                program = torch.export.load(path)
            module = program.module()
            device, fake = "cpu", True
            if shapes is None:
                placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
                values = [placeholders[name].meta.get("val") for name in program.graph_signature.user_inputs]
                if any(v is None or not all(isinstance(d, int) for d in v.shape[1:]) for v in values):
                    raise ValueError("the exported program's inputs have symbolic sizes beyond the batch: "
                                     "give --input-shapes")
                shapes = [[int(d) for d in v.shape[1:]] for v in values]
    linear_weights = {f"{name}.weight" for name, sub in module.named_modules()
                      if getattr(sub, "original_name", type(sub).__name__) == "Linear"}
    tensors = [(t.numel(), t.element_size(), name in linear_weights)
               for name, t in [*module.named_parameters(), *module.named_buffers()]]
    if precision in BYTES_PER_ELEMENT and precision != "fp32":
        module = module.to(dtype)
    one = _traced_peak(module, _torch_inputs(shapes, 1, device, dtype), fake)
    at_max = _traced_peak(module, _torch_inputs(shapes, batch, device, dtype), fake) if batch > 1 else one
    return tensors, one, at_max, shapes


def _onnx_plan(path: str, shapes: list[list[int]] | None,
               batch: int) -> tuple[list[tuple[int, int, bool]], int, int, list[list[int]]]:
    """Initializers counted without loading their data; activations by a liveness walk over the
    graph in its (topological) order, with the batch dimension set and shapes inferred."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(path, load_external_data=False)
    matmul_weights = {node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm")}
    tensors = [(math.prod(init.dims), ONNX_ELEMENT_BYTES.get(init.data_type, 4), init.name in matmul_weights)
               for init in model.graph.initializer]
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    if shapes is None:
        shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim[1:]] for i in graph_inputs]
        if any(d <= 0 for s in shapes for d in s):
            raise ValueError("the ONNX model's inputs have symbolic sizes beyond the batch: give --input-shapes")

    def peak_at(rows: int) -> int:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for graph_input, shape in zip(graph_inputs, shapes, strict=True):
            dims = next(i for i in fixed.graph.input if i.name == graph_input.name).type.tensor_type.shape.dim
            for dim, size in zip(dims, [rows, *shape], strict=True):
                dim.Clear()
                dim.dim_value = size
        inferred = shape_inference.infer_shapes(fixed)
        sizes: dict[str, int] = {}
        for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            kind = info.type.tensor_type
            dims = [d.dim_value for d in kind.shape.dim]
            if all(d > 0 for d in dims):
                sizes[info.name] = math.prod(dims) * ONNX_ELEMENT_BYTES.get(kind.elem_type, 4)
        last_use: dict[str, int] = {}
        for index, node in enumerate(inferred.graph.node):
            for name in node.input:
                last_use[name] = index
        outputs = {o.name for o in inferred.graph.output}
        live = sum(sizes.get(i.name, 0) for i in graph_inputs)
        peak = live
        for index, node in enumerate(inferred.graph.node):
            live += sum(sizes.get(name, 0) for name in node.output)
            peak = max(peak, live)
            for name in set(node.input):
                if name not in initializers and name not in outputs and last_use.get(name) == index:
                    live -= sizes.get(name, 0)
        return peak

    one = peak_at(1)
    return tensors, one, peak_at(batch) if batch > 1 else one, shapes


def _handler_plan(handler: str | None, max_batch_size: int) -> tuple[int, int, int, list[str]]:
    """What a Python handler declares of itself: its class attribute ``memory``, a dict with
    ``parameter_bytes`` and ``activation_bytes_per_sample`` (its code cannot be traced)."""
    from .worker.loaders import import_handler

    if not handler:
        raise ValueError("format python needs --handler module:Class")
    declared = getattr(import_handler(handler), "memory", None)
    if not isinstance(declared, dict) or not {"parameter_bytes", "activation_bytes_per_sample"} <= set(declared):
        raise ValueError(f"{handler} declares no memory: give the class an attribute memory = "
                         "{'parameter_bytes': ..., 'activation_bytes_per_sample': ...}, or serve it and read "
                         "its warm-up (forkless_worker_peak_memory_bytes)")
    per_sample = int(declared["activation_bytes_per_sample"])
    return int(declared["parameter_bytes"]), per_sample, per_sample * max_batch_size, [f"as {handler} declares it"]


def plan(model_path: str, fmt: str, precision: str = "fp32", max_batch_size: int = 32,
         input_shapes: str | None = None, gpu: str | None = None, gpu_memory: int | None = None,
         handler: str | None = None) -> Plan:
    shapes = parse_input_shapes(input_shapes) if input_shapes else None
    if fmt == "python":
        parameters, per_sample, at_max, notes = _handler_plan(handler, max_batch_size)
        result = Plan(handler or "", fmt, precision, max_batch_size, shapes or [], parameters, per_sample, at_max,
                      CUDA_CONTEXT_BYTES, worker_need(parameters, at_max), notes=notes)
        return _fit_on(result, gpu, gpu_memory)
    if fmt in ("torchscript", "torch-export"):
        tensors, one, at_max, shapes = _torch_plan(model_path, fmt, shapes, precision, max_batch_size)
    elif fmt == "onnx":
        tensors, one, at_max, shapes = _onnx_plan(model_path, shapes, max_batch_size)
    else:
        raise ValueError(f"unknown model format {fmt!r}")
    parameters = precision_parameter_bytes(tensors, precision)
    per_sample = max(0, (at_max - one) // (max_batch_size - 1)) if max_batch_size > 1 else one
    result = Plan(model_path, fmt, precision, max_batch_size, shapes, parameters, per_sample, at_max,
                  CUDA_CONTEXT_BYTES, worker_need(parameters, at_max))
    return _fit_on(result, gpu, gpu_memory)


def _fit_on(result: Plan, gpu: str | None, gpu_memory: int | None) -> Plan:
    if gpu is not None or gpu_memory is not None:
        result.gpu_name = gpu or "given"
        result.gpu_memory_bytes = gpu_memory if gpu_memory is not None else GPUS[gpu or ""]
        result.workers_that_fit, result.memory_fraction_each = fit(result.worker_bytes, result.gpu_memory_bytes)
    return result


def render_text(result: Plan) -> str:
    def size(value: int) -> str:
        for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
            if value >= scale:
                return f"{value / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
        return f"{value} B"

    lines = [
        f"model               {result.model} ({result.format}, {result.precision})",
        f"input shapes        {', '.join('x'.join(map(str, s)) for s in result.input_shapes) or 'not given'} per sample",
        f"parameters          {size(result.parameter_bytes)}",
        f"activations         {size(result.activation_bytes_per_sample)} per sample, "
        f"{size(result.activation_bytes_at_max_batch)} at the largest batch ({result.max_batch_size})",
        f"fixed per worker    {size(result.worker_fixed_bytes)} (CUDA context and workspaces, outside the allocator)",
        f"one worker needs    {size(result.worker_bytes)} on a GPU (context + parameters + "
        f"{ACTIVATION_FACTOR:g} x activations at the largest batch)",
    ]
    if result.gpu_memory_bytes is not None:
        if result.workers_that_fit:
            lines.append(f"on {result.gpu_name} ({size(result.gpu_memory_bytes)}): {result.workers_that_fit} worker(s) "
                         f"fit in {GPU_UTILIZATION:.0%} of its memory, each capped at gpuMemoryFraction "
                         f"{result.memory_fraction_each:g}")
        else:
            lines.append(f"on {result.gpu_name} ({size(result.gpu_memory_bytes)}): not even one worker fits; use a "
                         "smaller maxBatchSize, a lower precision or a larger GPU")
    lines += result.notes
    return "\n".join(lines)
