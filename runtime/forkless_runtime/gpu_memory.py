"""Figures of GPU memory that planning (`plan`), the worker's warm-up and `--workers auto` share."""

from __future__ import annotations

# What a CUDA context and the first cuBLAS/cuDNN handles cost a process, outside PyTorch's allocator:
# about 0.3-0.5 GiB with lazy module loading (pytorch#86509, #109888; notes/planning-precision.md).
# Replaced by the figure measured on the device (docs/gpu-report.md) once a GPU run has measured it.
CUDA_CONTEXT_BYTES = 512 * 2**20
# The share of a device's memory the workers may fill together, leaving room for fragmentation.
GPU_UTILIZATION = 0.9
