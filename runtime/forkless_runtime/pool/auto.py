"""`--workers auto`: the most workers that fit, decided from the first worker's measured need.

The first worker loads, runs its warm-up at the largest batch and reports its peak (on a GPU the
allocator's peak plus the CUDA context; on a CPU its resident set, shared library pages included,
so the count errs on the safe side) and, on a GPU, the device's total memory. The rest follows:
as many workers as fit in GPU_UTILIZATION of that memory (per GPU, the GPUs assumed alike; on a
CPU the container's memory limit), at most one per usable CPU (a worker is a Python process that
needs a core to feed its device), and no more than a gpuMemoryFraction allows when one is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..gpu_memory import CUDA_CONTEXT_BYTES, GPU_UTILIZATION
from .resources import CGROUP_ROOT

MEMINFO = Path("/proc/meminfo")
UNLIMITED = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def memory_limit_bytes(root: Path = CGROUP_ROOT, meminfo: Path = MEMINFO) -> int:
    """The container's memory limit (cgroup v2 memory.max, else v1), else the machine's memory."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text != "max" and text.isdigit() and int(text) < UNLIMITED:
            return int(text)
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("cannot read the memory limit: no cgroup limit and no /proc/meminfo")


@dataclass(frozen=True)
class AutoWorkers:
    workers: int
    per_gpu: int | None  # None on CPU
    gpu_memory_fraction: float | None  # the cap each GPU worker gets (the context sits outside it)
    reason: str


def decide(need_bytes: int, memory_bytes: int, cpus: int, gpus: int,
           gpu_memory_fraction: float | None = None) -> AutoWorkers:
    """How many workers, from one worker's need and the memory of one GPU (or of the container)."""
    need = max(1, need_bytes)
    by_memory = int(GPU_UTILIZATION * memory_bytes // need)
    gib = 2**30
    measured = f"one worker needs {need / gib:.2f} GiB of {memory_bytes / gib:.1f} GiB"
    if not gpus:
        workers = max(1, min(cpus, by_memory))
        limit = "the memory" if by_memory < cpus else "one per usable CPU"
        return AutoWorkers(workers, None, None, f"{measured}: {workers} worker(s) (the memory fits {by_memory}, "
                                                f"{cpus} usable CPU(s)), bounded by {limit}")
    per_gpu = max(1, by_memory)
    limit = f"{GPU_UTILIZATION:.0%} of the GPU's memory"
    if gpu_memory_fraction is not None and math.floor(1 / gpu_memory_fraction + 1e-9) < per_gpu:
        per_gpu, limit = max(1, math.floor(1 / gpu_memory_fraction + 1e-9)), f"gpuMemoryFraction {gpu_memory_fraction:g}"
    cap = max(gpus, cpus)
    if per_gpu * gpus > cap:
        per_gpu, limit = max(1, cap // gpus), f"one worker per usable CPU ({cpus})"
    fraction = gpu_memory_fraction
    if fraction is None:  # each worker's share, less the context that sits outside the allocator's cap
        share = GPU_UTILIZATION * memory_bytes / per_gpu
        fraction = min(1.0, max(0.001, math.floor(1000 * (share - CUDA_CONTEXT_BYTES) / memory_bytes) / 1000))
    return AutoWorkers(per_gpu * gpus, per_gpu, fraction,
                       f"{measured}: {per_gpu} per GPU x {gpus} GPU(s), bounded by {limit}")
