"""The command line, its environment variables, and CPU/GPU discovery without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from forkless_runtime.cli import build_parser
from forkless_runtime.pool.resources import cgroup_cpu_limit, default_threads, usable_cpus, visible_gpus
from forkless_runtime.settings import FLAGS, env_name, settings_from_args

CLI = str(Path(sys.executable).parent / "forkless-runtime")


def parse(argv: list[str]):
    parser = build_parser()
    return settings_from_args(parser.parse_args(argv), parser)


def test_fork_is_refused_at_argument_parsing_with_the_reason():
    result = subprocess.run([CLI, "serve", "--model-name", "m", "--model-uri", "m.pt", "--start-method", "fork"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Cannot re-initialize CUDA in forked subprocess" in result.stderr
    assert "OpenMP" in result.stderr


def test_every_flag_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("FORKLESS_MODEL_NAME", "cnn")
    monkeypatch.setenv("FORKLESS_MODEL_URI", "file:///models/cnn.pt2")
    monkeypatch.setenv("FORKLESS_WORKERS", "4")
    monkeypatch.setenv("FORKLESS_MAX_BATCH_DELAY_MS", "2.5")
    monkeypatch.setenv("FORKLESS_START_METHOD", "forkserver")
    settings = parse(["serve", "--workers", "3"])  # a flag wins over the environment
    assert (settings.model_name, settings.workers, settings.max_batch_delay_ms) == ("cnn", 3, 2.5)
    assert settings.start_method == "forkserver"
    assert settings.model_path == "/models/cnn.pt2" and settings.resolved_format == "torch-export"
    assert {env_name(f.field) for f in FLAGS} >= {"FORKLESS_WORKERS", "FORKLESS_GPU_MEMORY_FRACTION"}


def test_bad_environment_values_are_usage_errors(monkeypatch, capsys):
    monkeypatch.setenv("FORKLESS_START_METHOD", "fork")
    with pytest.raises(SystemExit) as exit_info:
        parse(["serve", "--model-name", "m", "--model-uri", "m.pt"])
    assert exit_info.value.code == 2
    assert "FORKLESS_START_METHOD='fork'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["serve", "--model-name", "m", "--model-uri", "m.bin"], "cannot infer the model format"),
    (["serve", "--model-name", "m", "--model-uri", "m.pt", "--gpu-memory-fraction", "1.5"], "must be in (0, 1]"),
    (["serve", "--model-name", "m", "--model-uri", "m.pt", "--workers", "0"], "must be >= 1"),
    (["serve", "--model-name", "m", "--format", "python", "--model-uri", "x"], "needs --handler"),
])
def test_invalid_flags_say_why(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_usable_cpus_honour_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, len(__import__("os").sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert default_threads(workers=4, cpus=16) == 4 and default_threads(workers=3, cpus=2) == 1


def test_gpus_are_counted_from_cuda_visible_devices_without_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")
    assert visible_gpus() == ["0"]
