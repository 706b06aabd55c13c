"""CPU and GPU discovery for the front-end, without torch and without probing CUDA.

torch marks a process unsafe to fork as soon as `torch.cuda.is_available()` runs, so the
front-end counts GPUs from CUDA_VISIBLE_DEVICES or the driver's /proc entries instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The container's CPU quota in cores (cgroup v2 `cpu.max`, else v1 cfs files), None if unlimited."""
    cpu_max = root / "cpu.max"
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may really use: its affinity mask, capped by the cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def visible_gpus() -> list[str]:
    """GPU ids a worker may be pinned to, as strings for CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [part.strip() for part in env.split(",") if part.strip()]
        # CUDA stops at the first invalid entry ("-1" hides every device).
        valid: list[str] = []
        for gpu in ids:
            if gpu.startswith("-"):
                break
            valid.append(gpu)
        return valid
    try:
        count = sum(1 for _ in NVIDIA_PROC.iterdir())
    except OSError:
        return []
    return [str(i) for i in range(count)]


def default_threads(workers: int, cpus: int | None = None) -> int:
    return max(1, (cpus if cpus is not None else usable_cpus()) // max(1, workers))
