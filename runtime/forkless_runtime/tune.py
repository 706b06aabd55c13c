"""`forkless-runtime tune`: sweep workers x batch size x batch delay on this machine, under load.

Each configuration runs as a real `forkless-runtime serve` on a free local port (the same process
layout a pod runs), loaded by an asyncio HTTP/1.1 client over kept-alive connections at each
concurrency for a fixed time. The table gives throughput, p50/p99 latency and each worker's
measured memory (its warm-up peak); the best configuration is the one with the highest throughput
whose p99 stays within the budget, printed as an InferenceService `runtime:` block to paste.
The load generator shares the machine with the server: on a small machine it takes its share of
the CPUs, which is said in the output rather than hidden.

Imports no torch: the servers it starts do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .protocol.tensors import dtype_of
from .settings import parse_input_shapes

READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Config:
    workers: int
    max_batch_size: int
    max_batch_delay_ms: float

    def describe(self) -> str:
        batching = "no batching" if self.max_batch_size == 1 else \
            f"batches of {self.max_batch_size} within {self.max_batch_delay_ms:g} ms"
        return f"{self.workers} worker(s), {batching}"


@dataclass
class Cell:
    workers: int
    max_batch_size: int
    max_batch_delay_ms: float
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    worker_peak_mib: float | None


def configs(workers: list[int], batch_sizes: list[int], delays: list[float]) -> list[Config]:
    """The grid, without the repeats a batch size of 1 makes (its delay does nothing)."""
    grid: list[Config] = []
    for count in workers:
        for size in batch_sizes:
            for delay in delays if size > 1 else delays[:1]:
                config = Config(count, size, delay if size > 1 else 0.0)
                if config not in grid:
                    grid.append(config)
    return grid


def best(cells: list[Cell], p99_budget_ms: float) -> Cell | None:
    """The highest throughput whose p99 is within the budget and which answered every request."""
    fitting = [c for c in cells if c.p99_ms <= p99_budget_ms and c.errors == 0]
    return max(fitting, key=lambda c: (c.requests_per_s, -c.p99_ms)) if fitting else None


def snippet(cell: Cell) -> str:
    """The InferenceService `runtime:` block for a tuned cell (spec.runtime of serving.forkless.dev)."""
    lines = ["runtime:", f"  workers: {cell.workers}"]
    if cell.max_batch_size > 1:
        lines += ["  batching:", f"    maxBatchSize: {cell.max_batch_size}", f"    maxDelayMs: {cell.max_batch_delay_ms:g}"]
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# --- the load generator ------------------------------------------------------------------------


def request_bytes(model: str, shapes: list[list[int]], datatypes: list[str], names: list[str]) -> bytes:
    inputs = []
    rng = np.random.default_rng(0)
    for name, shape, datatype in zip(names, shapes, datatypes, strict=True):
        array = rng.standard_normal((1, *shape)).astype(dtype_of(datatype or "FP32"))
        inputs.append({"name": name, "shape": [1, *shape], "datatype": datatype or "FP32",
                       "data": array.reshape(-1).tolist()})
    body = json.dumps({"inputs": inputs}).encode()
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _connection(port: int, payload: bytes, until: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(1)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def load(port: int, payload: bytes, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    """(latencies, errors, elapsed) of ``concurrency`` connections sending back to back for ``seconds``."""
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_connection(port, payload, until, latencies, errors) for _ in range(concurrency)))
    return latencies, len(errors), time.perf_counter() - started


# --- one server per configuration ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    def __init__(self, serve_args: list[str], config: Config) -> None:
        self.port = _free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop(), it outlives this call
        argv = [sys.executable, "-m", "forkless_runtime.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--grpc-port", "0", "--workers", str(config.workers), "--max-batch-size", str(config.max_batch_size),
                "--max-batch-delay-ms", f"{config.max_batch_delay_ms:g}", "--log-level", "warning", *serve_args]
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited with {self.process.returncode}: "
                                   f"{self.log.read().decode(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError, IndexError, ValueError):
                status, _ = self.get("/v2/health/ready")
                if status == 200 and self.metric("forkless_workers_ready") >= workers:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready with {workers} worker(s) within {READY_TIMEOUT_S:g}s")

    def metric(self, name: str) -> float:
        _, body = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                   if line.startswith((name + "{", name + " ")))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def run(serve_args: list[str], model: str, grid: list[Config], concurrencies: list[int], seconds: float,
        input_shapes: str | None, progress: Any = None) -> list[Cell]:
    cells: list[Cell] = []
    total = len(grid) * len(concurrencies)
    for config in grid:
        server = _Server(serve_args, config)
        try:
            server.wait_ready(config.workers)
            _, body = server.get(f"/v2/models/{model}")
            metadata = json.loads(body)
            declared = metadata.get("inputs", [])
            shapes = parse_input_shapes(input_shapes) if input_shapes else [t["shape"][1:] for t in declared]
            if not shapes or any(d < 1 for s in shapes for d in s):
                raise ValueError("the model declares no input shapes: give --input-shapes, e.g. 3x64x64")
            names = [t["name"] for t in declared] or [f"input-{i}" for i in range(len(shapes))]
            datatypes = [t.get("datatype", "") for t in declared] or [""] * len(shapes)
            payload = request_bytes(model, shapes, datatypes, names)
            peaks = server.metric("forkless_worker_peak_memory_bytes")
            peak_mib = peaks / config.workers / 2**20 if peaks else None
            for concurrency in concurrencies:
                asyncio.run(load(server.port, payload, concurrency, min(1.0, seconds / 3)))  # warm the path
                latencies, errors, elapsed = asyncio.run(load(server.port, payload, concurrency, seconds))
                cell = Cell(config.workers, config.max_batch_size, config.max_batch_delay_ms, concurrency,
                            len(latencies) / elapsed, 1000 * percentile(latencies, 50), 1000 * percentile(latencies, 99),
                            errors, peak_mib)
                cells.append(cell)
                if progress is not None:
                    progress(f"[{len(cells)}/{total}] {config.describe()}, {concurrency} connection(s): "
                             f"{cell.requests_per_s:.0f} req/s, p50 {cell.p50_ms:.1f} ms, p99 {cell.p99_ms:.1f} ms"
                             + (f", {errors} error(s)" if errors else ""))
        finally:
            server.stop()
    return cells


def render_table(cells: list[Cell], chosen: Cell | None, p99_budget_ms: float) -> str:
    lines = ["| workers | max batch | delay ms | connections | req/s | p50 ms | p99 ms | errors | MiB per worker |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        mark = " **best**" if c is chosen else ""
        memory = f"{c.worker_peak_mib:.0f}" if c.worker_peak_mib is not None else "-"
        lines.append(f"| {c.workers} | {c.max_batch_size} | {c.max_batch_delay_ms:g} | {c.concurrency} | "
                     f"{c.requests_per_s:.0f}{mark} | {c.p50_ms:.1f} | {c.p99_ms:.1f} | {c.errors} | {memory} |")
    lines.append("")
    if chosen is None:
        fastest = min(cells, key=lambda c: c.p99_ms) if cells else None
        lines.append(f"No configuration kept p99 within {p99_budget_ms:g} ms"
                     + (f"; the lowest p99 was {fastest.p99_ms:.1f} ms ({fastest.workers} worker(s), batch "
                        f"{fastest.max_batch_size}, {fastest.concurrency} connection(s))." if fastest else "."))
    else:
        lines += [f"Best within p99 {p99_budget_ms:g} ms: {chosen.requests_per_s:.0f} req/s at {chosen.concurrency} "
                  f"connection(s), p99 {chosen.p99_ms:.1f} ms. For the InferenceService's spec:", "", snippet(chosen)]
    lines += ["", "The load generator ran on this machine beside the server and took its share of the CPUs."]
    return "\n".join(lines)


def report(cells: list[Cell], p99_budget_ms: float) -> dict[str, Any]:
    chosen = best(cells, p99_budget_ms)
    return {"p99_budget_ms": p99_budget_ms, "cells": [asdict(c) for c in cells],
            "best": asdict(chosen) if chosen else None, "snippet": snippet(chosen) if chosen else None}
