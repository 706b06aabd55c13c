#!/usr/bin/env python3
"""Precision and planning, side by side in one run, on the example models and one the planner never saw.

Precision: each model loaded by the worker's own loader (forkless_runtime.worker.loaders.load_model,
as `serve --precision P` does) in fp32, bf16 and int8, one thread, batch 32; ms per batch (best
of --rounds medians), the speed against fp32, and the largest absolute error against fp32. A
precision this machine refuses is listed with the refusal.

Planning: `forkless-runtime plan`'s traced activations at the largest batch against what a real
worker's warm-up measures at that batch (the kernel's peak resident set, in a fresh process per
model), and the ratio. The transformer is a model the planner was never developed against.

Writes bench/results/precision-latest.{json,md}.

    .venv/bin/python bench/precision.py [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import warnings

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PRECISIONS = ("fp32", "bf16", "int8")


class LinearHeavy(nn.Module):
    """notes/planning-precision.md's MLP: 1024 -> 4096 -> 4096 -> 1024, where int8 pays most."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                    nn.Linear(4096, 1024))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Transformer(nn.Module):
    """Two encoder layers over 64 tokens of 256: never used while the planner was written."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def write_models(directory: Path) -> dict[str, tuple[Path, str]]:
    """name -> (TorchScript file, per-sample input shape)."""
    from forkless_runtime.example_models import save_torchscript

    models = {"mlp": (directory / "mlp.pt", "16"), "cnn": (directory / "cnn.pt", "3x64x64")}
    for name, (path, _) in models.items():
        save_torchscript(name, path)
    torch.manual_seed(0)
    for name, module, shape in (("linear-heavy", LinearHeavy(), "1024"), ("transformer", Transformer(), "64x256")):
        example = torch.randn(2, *map(int, shape.split("x")))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(module.eval(), example, check_trace=False).save(str(directory / f"{name}.pt"))
        models[name] = (directory / f"{name}.pt", shape)
    return models


def time_precision(path: Path, shape: str, precision: str, batch: int, rounds: int) -> dict:
    from forkless_runtime.precision import precision_problem
    from forkless_runtime.protocol.tensors import NamedTensor
    from forkless_runtime.worker.loaders import load_model

    problem = precision_problem(precision, "cpu", "torchscript")
    if problem:
        return {"refused": problem}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("torchscript", str(path), None, "cpu", 1, precision)
    rng = np.random.default_rng(0)
    inputs = [NamedTensor("x", rng.standard_normal((batch, *map(int, shape.split("x"))), dtype=np.float32))]
    for _ in range(3):
        model.predict(inputs)
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(10):
            started = time.perf_counter()
            output = model.predict(inputs)[0].array
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    return {"ms": 1000 * min(medians), "output": output, "notes": model.notes}


MEASURE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from forkless_runtime.worker.loaders import load_model
from forkless_runtime.worker.warmup import sample_inputs, measure
model = load_model("torchscript", sys.argv[1], None, "cpu", 1, "fp32")
tensors = sample_inputs(model, sys.argv[2], int(sys.argv[3]))
print(json.dumps(measure(model, tensors, "cpu").as_dict()))  # the first batch, as the worker's warm-up
"""


def planned_and_measured(path: Path, shape: str, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plan = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "forkless-runtime"), "plan", "--model-uri", str(path), "--input-shapes",
         shape, "--max-batch-size", str(batch), "--output", "json"], capture_output=True, text=True, check=True,
        env=env).stdout)
    measured = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(path), shape, str(batch)],
                                         capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1])
    planned = plan["activation_bytes_at_max_batch"]
    return {"planned_activation_bytes": planned, "measured_activation_bytes": measured["activation_bytes"],
            "measured_peak_bytes": measured["peak_bytes"], "ratio": measured["activation_bytes"] / planned,
            "parameter_bytes": plan["parameter_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        models = write_models(Path(tmp))
        precision_rows, planning_rows = [], []
        for name, (path, shape) in models.items():
            results = {p: time_precision(path, shape, p, args.batch, args.rounds) for p in PRECISIONS}
            base = results["fp32"]
            for precision, result in results.items():
                row = {"model": name, "precision": precision}
                if "refused" in result:
                    row["refused"] = result["refused"]
                else:
                    row.update(ms=result["ms"], speedup=base["ms"] / result["ms"],
                               max_abs_error=float(np.abs(result["output"] - base["output"]).max()),
                               max_abs_output=float(np.abs(base["output"]).max()))
                precision_rows.append(row)
                print(json.dumps(row), flush=True)
            planning = {"model": name, "batch": args.batch, **planned_and_measured(path, shape, args.batch)}
            planning_rows.append(planning)
            print(json.dumps(planning), flush=True)
    report = {"started": started, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "batch": args.batch, "precision": precision_rows, "planning": planning_rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precision-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "precision-latest.md").write_text(markdown(report))
    print((RESULTS / "precision-latest.md").read_text())


def markdown(report: dict) -> str:
    lines = [
        "# Precision and planning on this machine", "",
        f"{report['started']}, {report['cpus']} CPUs, torch {report['torch']}, one thread, batch {report['batch']}. "
        "Each model through the worker's own loader; speed against fp32 in the same run; error against fp32.", "",
        "| model | precision | ms / batch | vs fp32 | max abs error | max abs output |", "|---|---|---|---|---|---|",
    ]
    for row in report["precision"]:
        if "refused" in row:
            lines.append(f"| {row['model']} | {row['precision']} | refused: {row['refused']} | | | |")
        else:
            lines.append(f"| {row['model']} | {row['precision']} | {row['ms']:.2f} | {row['speedup']:.2f}x | "
                         f"{row['max_abs_error']:.2e} | {row['max_abs_output']:.3f} |")
    lines += [
        "", "## `forkless-runtime plan` against a real worker's warm-up", "",
        "Planned: activations traced on meta tensors at the batch. Measured: the growth of a fresh worker's peak "
        "resident set in its warm-up batch (its first, as a worker measures it). The plan reserves 2x the traced figure.", "",
        "| model | batch | parameters | planned activations | measured | measured / planned |", "|---|---|---|---|---|---|",
    ]
    for row in report["planning"]:
        lines.append(f"| {row['model']} | {row['batch']} | {row['parameter_bytes'] / 2**20:.2f} MiB | "
                     f"{row['planned_activation_bytes'] / 2**20:.2f} MiB | {row['measured_activation_bytes'] / 2**20:.2f} MiB | "
                     f"{row['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
