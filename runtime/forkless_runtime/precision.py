"""Which precision can run where, decided without torch (the front-end and the operator's rules use it).

The measured facts behind each refusal (docs/planning.md, notes/planning-precision.md): fp16 on a CPU runs about 2x slower than
fp32; bf16 is only fast where the CPU has bf16 instructions (avx512_bf16 or AMX on x86, the `bf16`
feature on Arm) and is emulated elsewhere; int8 here is dynamic quantization, which has CPU kernels
only; a loaded torch.export program or a Python handler has no nn.Linear modules left to swap, so
quantizing them would silently change nothing.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_features(cpuinfo: str) -> tuple[str, list[str]] | None:
    """The first CPU's feature list in /proc/cpuinfo and its key (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return key.strip(), value.split()
    return None


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The bf16 instruction flags the first CPU lists."""
    features = cpu_features(cpuinfo)
    return [flag for flag in features[1] if flag in BF16_CPU_FLAGS] if features else []


def int8_needs_reduced_range(cpuinfo: str) -> bool:
    """An x86 CPU without VNNI multiplies u8 x s8 with 16-bit saturation: onnxruntime's int8 results
    go wrong (measured: an error of 4.0 on outputs of 6.2) unless weights are quantized to 7 bits."""
    features = cpu_features(cpuinfo)
    return features is not None and features[0] == "flags" and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(features[1])


def cpu_supports_bf16(path: Path = CPUINFO) -> bool:
    try:
        return bool(cpu_bf16_flags(path.read_text()))
    except OSError:
        return False


def precision_problem(precision: str, device: str, fmt: str, bf16_cpu: bool | None = None) -> str | None:
    """Why ``precision`` cannot serve a ``fmt`` model on ``device`` (cpu or cuda), or None when it can."""
    if precision == "fp32":
        return None
    if precision in ("fp16", "bf16") and fmt == "onnx":
        return (f"precision {precision} is not applied to ONNX models: convert the model offline "
                "(onnxconverter_common.float16) and serve the converted file with precision fp32")
    if precision == "fp16" and device != "cuda":
        return "precision fp16 needs a GPU: on a CPU fp16 runs about 2x slower than fp32; use bf16 or int8 on CPUs"
    if precision == "bf16" and device != "cuda":
        if bf16_cpu is None:
            bf16_cpu = cpu_supports_bf16()
        if not bf16_cpu:
            return ("precision bf16 on a CPU needs bf16 instructions (avx512_bf16 or AMX on x86, bf16 on Arm), "
                    "which this CPU lacks: it would be emulated and slower than fp32; use fp32 or int8 here")
    if precision == "int8":
        if device == "cuda":
            return "precision int8 is dynamic quantization, which runs on CPUs only; use fp16 or bf16 on a GPU"
        if fmt == "torch-export":
            return ("precision int8 cannot quantize a loaded torch.export program (it has no modules left to "
                    "swap): quantize before export (torchao's pt2e flow) and serve the result with precision fp32")
        if fmt == "python":
            return "precision int8 is not applied to Python handlers: quantize in the handler's load()"
    return None
