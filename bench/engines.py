#!/usr/bin/env python3
"""The same model through both engines, side by side in one run, on the same cores: forkless-runtime
(engine deployment) and Ray Serve running the serveConfigV2 the operator renders (engine ray), with
Serve's Python proxy and with its HAProxy ingress.

The light example MLP, two workers / two Serve replicas of one thread each, batching up to 16 samples
with a 2 ms wait, `max_ongoing_requests` 64. Load: wrk -t1 posting a batch-1 V2 JSON body, at 1 and 64
connections, after a warm-up. Ray is started as KubeRay starts it (`ray start --head`) and given the
config through Serve's REST API, as KubeRay does; it needs `make ray-env`.

Writes bench/results/engines-latest.{json,md}.

    .venv/bin/python bench/engines.py [--duration 10] [--connections 1,64] [--ingress proxy,haproxy]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import write_bodies, wrk  # noqa: E402 - the same wrk cells as the runtime's bench
from tests.runtime.conftest import start_server  # noqa: E402 - the same server the tests start
from tests.runtime.test_ray_engine import RAY_ENV, LocalRay, rendered_config  # noqa: E402

RESULTS = REPO / "bench" / "results"
MODELS = REPO / ".models"


def say(message: str) -> None:
    print(f"[engines {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(url: str, body: dict[str, str], connections: list[int], warmup: float, duration: float) -> dict[str, dict]:
    cells = {}
    for conns in connections:
        wrk(url, body, conns, warmup)
        cells[str(conns)] = wrk(url, body, conns, duration)
        say(f"  {conns} connection(s): {cells[str(conns)]['rps']:.0f} req/s, p50 {cells[str(conns)]['p50_ms']:.2f} ms, "
            f"p99 {cells[str(conns)]['p99_ms']:.2f} ms, {cells[str(conns)]['errors']:.0f} errors")
    return cells


def forkless(tmp: Path, body: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    server = start_server(tmp, "--model-name", "mlp", "--model-uri", str(MODELS / "mlp.pt"), "--workers", "2",
                          "--threads-per-worker", "1", "--max-batch-size", "16", "--max-batch-delay-ms", "2")
    try:
        return measure(f"{server.url}/v2/models/mlp/infer", body, args.connections, args.warmup, args.duration)
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)


def ray(tmp: Path, body: dict[str, str], ingress: str, args: argparse.Namespace) -> dict[str, dict]:
    local = LocalRay(tmp)
    if ingress == "haproxy":
        local.env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    try:
        started = time.monotonic()
        local.start()
        config = rendered_config(MODELS / "mlp.pt", local.http_port,
                                 runtime={"workers": 2, "threadsPerWorker": 1,
                                          "batching": {"maxBatchSize": 16, "maxDelayMs": 2}},
                                 ray={"maxOngoingRequests": 64, "ingress": ingress})
        config["applications"][0]["args"]["settings"].pop("signature")  # bench bodies name their input input-0
        local.deploy(config)
        local.wait_for_app("mlp", "RUNNING")
        url = f"http://127.0.0.1:{local.http_port}/v2/models/mlp/infer"
        httpx.post(url, content=Path(body["file"]).read_bytes(), timeout=30).raise_for_status()
        say(f"  ray ({ingress}) serving {time.monotonic() - started:.1f} s after ray start")
        return measure(url, body, args.connections, args.warmup, args.duration)
    finally:
        local.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--ingress", type=lambda s: s.split(","), default=["proxy", "haproxy"])
    args = parser.parse_args()
    if not RAY_ENV.exists():
        sys.exit("Ray Serve is not installed beside the venv: make ray-env")
    if not (MODELS / "mlp.pt").exists():
        sys.exit("no example models: make models")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="forkless-engines-") as tmp_name:
        tmp = Path(tmp_name)
        body = write_bodies(tmp)["light-json"]
        say("forkless-runtime (engine deployment): 2 workers ...")
        results["forkless"] = forkless(tmp, body, args)
        for ingress in args.ingress:
            say(f"Ray Serve (engine ray, {ingress}): 2 replicas ...")
            (tmp / ingress).mkdir()
            results[f"ray-{ingress}"] = ray(tmp / ingress, body, ingress, args)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
              "cpus": __import__("os").cpu_count(), "settings": vars(args), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engines-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Engines side by side: forkless-runtime against Ray Serve (engine ray), same model, same cores", "",
             f"{report['date']}, {report['cpus']} CPUs. The light MLP, 2 workers / 2 Serve replicas of 1 thread, "
             f"batches of up to 16 (2 ms), max_ongoing_requests 64; wrk -t1, batch-1 V2 JSON, "
             f"{args.duration:g} s per cell after {args.warmup:g} s of warm-up.", "",
             "| engine | conns | req/s | p50 ms | p99 ms | errors | req/s vs forkless |", "|---|---|---|---|---|---|---|"]
    for name, cells in results.items():
        for conns, cell in cells.items():
            base = results["forkless"][conns]["rps"]
            lines.append(f"| {name} | {conns} | {cell['rps']:.0f} | {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | "
                         f"{cell['errors']:.0f} | {cell['rps'] / base:.2f}x |")
    (RESULTS / "engines-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
