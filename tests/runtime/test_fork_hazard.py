"""The hazard forkless exists to avoid, reproduced for real (CPU here; CUDA in the gpu tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fork_hazard.py")


def run_pattern(method: str, device: str = "cpu") -> list[str]:
    result = subprocess.run([sys.executable, str(SCRIPT), method, "--device", device], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["children"]


@pytest.mark.slow
def test_forked_children_hang_in_openmp_after_the_parent_ran_torch_while_spawned_ones_finish():
    assert run_pattern("fork") == ["hung", "hung"]
    assert run_pattern("spawn") == ["ok", "ok"]
