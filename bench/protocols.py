#!/usr/bin/env python3
"""HTTP against gRPC on one forkless-runtime server, side by side in one run, with Triton's own clients.

One `forkless-runtime serve` of the light example model (2 workers, batching on) answers both
protocols; each client process (tritonclient.http.aio or tritonclient.grpc.aio, binary tensors)
keeps ``--concurrency`` requests in flight for ``--duration`` seconds. Reported: requests/s, p50 and
p99 per protocol and concurrency, and gRPC / HTTP. The clients are Python: the figures say what a
tritonclient user sees, and how the two protocols compare through the same front-end, not the
front-end's ceiling (`make bench`'s wrk cells measure that).

Writes bench/results/protocols-latest.{json,md}.

    .venv/bin/python bench/protocols.py [--duration 5] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.runtime.conftest import start_server  # noqa: E402 - the same server the tests start

RESULTS = REPO / "bench" / "results"
MODELS = REPO / ".models"

# Runs in its own process: tritonclient's protobuf module and the runtime's share a package name.
CLIENT = """
import asyncio, json, sys, time
import numpy as np
protocol, url, concurrency, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if protocol == "grpc":
    import tritonclient.grpc.aio as client_module
else:
    import tritonclient.http.aio as client_module

async def main():
    client = client_module.InferenceServerClient(url)
    tensor = client_module.InferInput("input-0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    latencies = []
    deadline = time.perf_counter() + duration
    async def loop():
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await client.infer("mlp", [tensor])
            latencies.append(time.perf_counter() - started)
    await client.infer("mlp", [tensor])
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    latencies.sort()
    print(json.dumps({"rps": len(latencies) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
                      "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}))

asyncio.run(main())
"""


def measure(protocol: str, url: str, concurrency: int, duration: float) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-c", CLIENT, protocol, url, str(concurrency), str(duration)],
                         capture_output=True, text=True, timeout=duration * 4 + 60, check=True)
    return json.loads(run.stdout)


def markdown(report: dict) -> str:
    lines = [
        "# HTTP and gRPC through one forkless-runtime server, with Triton's clients",
        "",
        f"{report['when']}, {report['cpus']} CPUs; the light MLP, 2 workers, batching on; tritonclient "
        f"{report['client']} asyncio clients, binary tensors, {report['duration_s']:g} s per cell, best of "
        f"{report['rounds']}. The client runs on the same cores as the server.",
        "",
        "| concurrency | HTTP req/s (p50 / p99 ms) | gRPC req/s (p50 / p99 ms) | gRPC / HTTP |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        http, grpc = row["http"], row["grpc"]
        lines.append(f"| {row['concurrency']} | {http['rps']:.0f} ({http['p50_ms']:.2f} / {http['p99_ms']:.2f}) | "
                     f"{grpc['rps']:.0f} ({grpc['p50_ms']:.2f} / {grpc['p99_ms']:.2f}) | "
                     f"{grpc['rps'] / http['rps']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(MODELS)], check=True,
                   capture_output=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        server = start_server(Path(work), "--model-name", "mlp", "--model-uri", str(MODELS / "mlp.pt"),
                              "--workers", "2", "--max-batch-size", "16", "--max-batch-delay-ms", "1",
                              "--log-level", "warning")
        try:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                best: dict[str, dict[str, float]] = {}
                for _ in range(args.rounds):  # alternate the protocols; keep each one's best round
                    for protocol, url in (("http", f"127.0.0.1:{server.port}"),
                                          ("grpc", f"127.0.0.1:{server.grpc_port}")):
                        result = measure(protocol, url, concurrency, args.duration)
                        if protocol not in best or result["rps"] > best[protocol]["rps"]:
                            best[protocol] = result
                print(f"c={concurrency}: {best}", file=sys.stderr, flush=True)
                rows.append({"concurrency": concurrency, **best})
        finally:
            server.stop()
    from importlib.metadata import version

    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": len(os.sched_getaffinity(0)),
              "machine": platform.machine(), "client": version("tritonclient"), "duration_s": args.duration,
              "rounds": args.rounds, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protocols-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "protocols-latest.md").write_text(markdown(report))
    print((RESULTS / "protocols-latest.md").read_text())


if __name__ == "__main__":
    main()
