"""Reduced precision, applied in the worker after the model loads (imports torch or onnxruntime).

fp16/bf16 cast the module and, per call, its floating inputs; the floating outputs go back to the
datatype the client sent, so clients keep their own datatypes. int8 is dynamic quantization on CPU:
TorchScript through torch's JIT pass, ONNX through onnxruntime's quantizer. Both are checked to have
really changed the model: torch's eager quantize_dynamic returns a loaded module unchanged without a
word (notes/planning-precision.md), and a silent fp32 model served as "int8" would be a lie.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from ..precision import CPUINFO, int8_needs_reduced_range

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# Op types onnxruntime's dynamic quantizer writes; a model without any was not quantized.
ONNX_QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                      "QLinearMatMul", "QLinearConv", "QAttention", "DynamicQuantizeLSTM"}


class NothingToQuantize(ValueError):
    """int8 was asked for, and the quantizer changed nothing."""


def torch_dtype(precision: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[precision])


def cast_torch_module(module: Any, precision: str) -> Any:
    """The module in fp16 or bf16 (TorchScript and torch.export modules both take .to(dtype))."""
    return module.to(torch_dtype(precision))


def quantize_torchscript(module: Any) -> tuple[Any, str]:
    """Dynamic int8 quantization of a loaded TorchScript module's Linear layers, verified."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic_jit

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated; docs/planning.md says so once
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic_jit(module, {"": default_dynamic_qconfig})
    graph = str(quantized.inlined_graph)
    swapped = graph.count("quantized::linear_dynamic")
    left = graph.count("aten::linear(")
    if not swapped:
        raise NothingToQuantize(
            "precision int8 found nothing to quantize: dynamic quantization covers Linear layers and this "
            "TorchScript model has none; serve it with precision fp32 (or bf16 where the CPU has it)"
        )
    return quantized, f"int8: {swapped} Linear layer(s) dynamically quantized" + (f", {left} left in fp32" if left else "")


def quantize_onnx(path: str) -> tuple[str, str]:
    """onnxruntime's dynamic int8 quantization into a temporary file, verified by the ops it wrote."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    handle, target = tempfile.mkstemp(prefix="forkless-int8-", suffix=".onnx")
    os.close(handle)
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError:
        cpuinfo = ""
    reduce_range = int8_needs_reduced_range(cpuinfo)
    quantize_dynamic(path, target, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    ops = {node.op_type for node in onnx.load(target, load_external_data=False).graph.node}
    if not ops & ONNX_QUANTIZED_OPS:
        os.unlink(target)
        raise NothingToQuantize(
            "precision int8 found nothing to quantize: onnxruntime's dynamic quantizer covers MatMul, Gemm, "
            "Conv, Attention and LSTM nodes and left this model unchanged; serve it with precision fp32"
        )
    before, after = os.path.getsize(path), os.path.getsize(target)
    how = "7-bit weights: this CPU has no VNNI" if reduce_range else "8-bit weights"
    return target, f"int8: onnxruntime dynamic quantization ({how}), {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"


def cast_calls(call: Callable[..., Any], precision: str) -> Callable[..., Any]:
    """Wrap a module call: floating inputs in the model's dtype, floating outputs back in the dtype
    of the first floating input (what the client sent)."""
    import torch

    dtype = torch_dtype(precision)

    def back(value: Any, original: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(original) if value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: back(v, original) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(back(v, original) for v in value)
        return value

    def wrapped(*args: Any) -> Any:
        original = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        result = call(*(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
        return result if original is None else back(result, original)

    return wrapped
