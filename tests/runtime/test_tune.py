"""`forkless-runtime tune`: a real sweep of real servers under its own load, and the pick it makes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from forkless_operator.spec import RuntimeSpec
from forkless_runtime.tune import Cell, Config, best, configs, snippet

from .conftest import CLI


def cell(workers: int, size: int, rps: float, p99: float, errors: int = 0) -> Cell:
    return Cell(workers, size, 2.0 if size > 1 else 0.0, 8, rps, p99 / 2, p99, errors, 500.0)


def test_the_grid_tries_a_delay_only_where_requests_are_batched() -> None:
    assert configs([1, 2], [1, 8], [0, 5]) == [
        Config(1, 1, 0.0), Config(1, 8, 0), Config(1, 8, 5), Config(2, 1, 0.0), Config(2, 8, 0), Config(2, 8, 5)]


def test_the_best_is_the_fastest_within_the_p99_budget_that_lost_nothing() -> None:
    cells = [cell(1, 1, 900, 20), cell(2, 8, 1500, 80), cell(2, 32, 2000, 150), cell(1, 8, 1800, 40, errors=3)]
    assert best(cells, 100) is cells[1]
    assert best(cells, 10) is None


def test_the_snippet_is_a_valid_runtime_block_of_the_inferenceservice() -> None:
    runtime = yaml.safe_load(snippet(cell(2, 8, 1500, 80)))["runtime"]
    parsed = RuntimeSpec.model_validate(runtime)
    assert (parsed.workers, parsed.batching.max_batch_size, parsed.batching.max_delay_ms) == (2, 8, 2.0)
    assert RuntimeSpec.model_validate(yaml.safe_load(snippet(cell(1, 1, 900, 20)))["runtime"]).batching is None


def test_a_sweep_on_this_machine_measures_every_cell_and_picks_one(models: Path) -> None:
    result = subprocess.run(
        [CLI, "tune", "--model-uri", str(models / "mlp.pt"), "--model-name", "mlp", "--input-shapes", "16",
         "--workers", "1", "--max-batch-size", "1,4", "--concurrency", "1,4", "--duration-s", "1",
         "--p99-ms", "1000", "--output", "json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    cells = report["cells"]
    assert [(c["max_batch_size"], c["concurrency"]) for c in cells] == [(1, 1), (1, 4), (4, 1), (4, 4)]
    for c in cells:
        assert c["requests_per_s"] > 0 and c["errors"] == 0 and c["p99_ms"] >= c["p50_ms"] > 0
        assert c["worker_peak_mib"] > 100  # the warm-up's measured peak: torch alone is more than that
    assert report["best"] is not None and report["snippet"].startswith("runtime:\n  workers: 1")
    assert "[4/4] 1 worker(s), batches of 4 within 2 ms, 4 connection(s)" in result.stderr  # progress shown


def test_a_budget_nothing_meets_is_said_plainly(models: Path) -> None:
    result = subprocess.run(
        [CLI, "tune", "--model-uri", str(models / "mlp.pt"), "--model-name", "mlp", "--input-shapes", "16",
         "--workers", "1", "--max-batch-size", "1", "--concurrency", "2", "--duration-s", "0.5", "--p99-ms", "0.001"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No configuration kept p99 within 0.001 ms; the lowest p99 was" in result.stdout
