#!/usr/bin/env python3
"""`make run` for the runtime alone: serve the example MLP with two spawned workers, ask it once, stop.

Shows each step. Uses only the standard library as a client so it runs from any Python.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    command = [os.path.join(os.path.dirname(sys.executable), "forkless-runtime"), "serve", "--model-name", "mlp",
               "--model-uri", args.model, "--workers", "2", "--port", str(args.port), "--host", "127.0.0.1"]
    print(f"==> starting: {' '.join(command)}", flush=True)
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 120
        print("==> waiting for /v2/health/ready (each worker spawns, imports torch, loads the model)", flush=True)
        while True:
            try:
                if http("GET", base + "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("==> model metadata:", json.dumps(http("GET", base + "/v2/models/mlp")[1]), flush=True)
        v2_body = {"inputs": [{"name": "input-0", "shape": [2, 16], "datatype": "FP32",
                               "data": [[0.1 * i for i in range(16)], [1.0] * 16]}]}
        status, answer = http("POST", base + "/v2/models/mlp/infer", v2_body)
        print(f"==> POST /v2/models/mlp/infer -> {status}: {json.dumps(answer)}", flush=True)
        status, answer = http("POST", base + "/v1/models/mlp:predict", {"instances": [[0.5] * 16]})
        print(f"==> POST /v1/models/mlp:predict -> {status}: {json.dumps(answer)}", flush=True)
        ok = status == 200
    finally:
        print("==> SIGTERM: draining and stopping", flush=True)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"==> server exited with {code}", flush=True)
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
