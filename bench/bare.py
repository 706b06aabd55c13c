"""The bare model in-process: the physical limit on these cores. Prints one JSON line.

Run: python bench/bare.py MODEL.pt SHAPE (e.g. 16 or 3,64,64) [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)


def throughput(module, batch: int, shape: tuple[int, ...], seconds: float) -> float:
    x = torch.randn(batch, *shape)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            module(x)
            done += batch
    return done / (time.perf_counter() - start)


def latency_ms(module, shape: tuple[int, ...], repeats: int) -> float:
    x = torch.randn(1, *shape)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            module(x)
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("shape")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--single", metavar="THREADS,BATCH", help="measure one cell only (for side-by-side processes)")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    module = torch.jit.load(args.model)
    module.eval()
    if args.single:
        threads, batch = (int(v) for v in args.single.split(","))
        torch.set_num_threads(threads)
        print(json.dumps({"samples_per_s": throughput(module, batch, shape, args.seconds)}))
        return
    cells = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (1, 8, 32):
            cells[f"threads={threads},batch={batch}"] = throughput(module, batch, shape, args.seconds)
    torch.set_num_threads(1)
    result = {
        "best_samples_per_s": max(cells.values()),
        "best_cell": max(cells, key=cells.get),
        "cells": cells,
        "batch1_latency_ms_1thread": latency_ms(module, shape, 300),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
