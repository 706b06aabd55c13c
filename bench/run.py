#!/usr/bin/env python3
"""`make bench`: forkless-runtime side by side with the bare model and the front-end ceiling.

Every system is measured in the same run on the same cores, alternating systems between rounds
(best of the rounds), with wrk (Debian) as the load generator. Writes bench/results/<stamp>.json,
latest.json, latest.md and PNG plots. Refuses to start on a busy machine unless --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
MODELS = ROOT / ".models"
PY = sys.executable
CLI = str(Path(sys.executable).parent / "forkless-runtime")

LIGHT_SHAPE = (1, 16)
HEAVY_SHAPE = (1, 3, 64, 64)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    say("wrk not found: installing Debian's wrk (apt-get)")
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


def write_bodies(directory: Path) -> dict[str, dict[str, str]]:
    """V2 batch-1 bodies: light JSON, light binary (Inference-Header-Content-Length), heavy JSON."""
    rng = np.random.default_rng(0)
    bodies = {}
    for name, shape in (("light", LIGHT_SHAPE), ("heavy", HEAVY_SHAPE)):
        x = rng.standard_normal(shape).astype(np.float32)
        body = orjson.dumps({"inputs": [{"name": "input-0", "shape": list(shape), "datatype": "FP32",
                                         "data": x.reshape(-1).tolist()}]})
        path = directory / f"{name}.json"
        path.write_bytes(body)
        bodies[f"{name}-json"] = {"file": str(path), "content_type": "application/json", "header_length": ""}
    x = rng.standard_normal(LIGHT_SHAPE).astype(np.float32)
    header = orjson.dumps({"inputs": [{"name": "input-0", "shape": list(LIGHT_SHAPE), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]})
    path = directory / "light.bin"
    path.write_bytes(header + x.tobytes())
    bodies["light-binary"] = {"file": str(path), "content_type": "application/octet-stream",
                              "header_length": str(len(header))}
    return bodies


def wrk(url: str, body: dict[str, str], connections: int, seconds: float) -> dict[str, float]:
    env = {**os.environ, "BODY_FILE": body["file"], "CONTENT_TYPE": body["content_type"],
           "HEADER_LENGTH": body["header_length"]}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(BENCH / "wrk_post.lua"), url]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not line:
        raise RuntimeError(f"wrk printed no summary: {out.stdout}\n{out.stderr}")
    raw = json.loads(line[-1])
    seconds_run = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["non2xx"]
    return {"rps": ok / seconds_run, "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "errors": raw["non2xx"] + raw["socket_errors"] + raw["timeouts"]}


def settle(connections: int, rps: float) -> None:
    """Wait for the requests a stopped wrk left in flight to be served (twice the time ``connections``
    requests take at ``rps``, at most 10 s): else the measured run's first requests queue behind them
    and the tail it reports is the warm-up's. forkless drops a queued request whose client hung up, other
    servers serve it; waiting measures every system in its steady state."""
    time.sleep(min(10.0, 2 * connections / max(rps, 1.0)))


class Service:
    """A server process under test: started, waited for, and stopped for each round."""

    def __init__(self, name: str, command: list[str], ready_path: str, infer_path: str, payloads: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.name, self.command, self.ready_path, self.infer_path = name, command, ready_path, infer_path
        self.payloads, self.env = payloads, env or {}
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, log_dir: Path) -> None:
        self.port = free_port()
        command = [part.replace("{port}", str(self.port)) for part in self.command]
        log = open(log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                        start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(self.url(self.ready_path), timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def forkless(name: str, model: str, workers: int, batching: bool, payloads: list[str], **extra: str) -> Service:
    command = [CLI, "serve", "--model-name", "m", "--model-uri", str(MODELS / model), "--workers", str(workers),
               "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning", "--max-queue", "4096",
               "--grpc-port", "0"]
    command += ["--max-batch-size", "32", "--max-batch-delay-ms", "5"] if batching else ["--max-batch-size", "1"]
    for flag, value in extra.items():
        command += [f"--{flag.replace('_', '-')}", value]
    return Service(name, command, "/v2/health/ready", "/v2/models/m/infer", payloads)


KSERVE_VENV = ROOT / ".bench-venv" / "kserve"
KSERVE_PINS = ["kserve==0.21.0", "torch==2.15.0"]


def ensure_kserve() -> Path:
    """KServe in its own virtual environment, so its pins never touch ours."""
    python = KSERVE_VENV / "bin" / "python"
    stamp = KSERVE_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != " ".join(KSERVE_PINS):
        say(f"installing {' '.join(KSERVE_PINS)} into {KSERVE_VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *KSERVE_PINS], check=True)
        stamp.write_text(" ".join(KSERVE_PINS))
    return python


def kserve(name: str, model: str, workers: int, best: bool, payloads: list[str]) -> Service:
    command = [str(KSERVE_VENV / "bin" / "python"), str(BENCH / "kserve_server.py"), "--model_name", "m",
               "--model_path", str(MODELS / model), "--http_port", "{port}", "--workers", str(workers)]
    env = {}
    if best:
        command += ["--lazy", "--torch_threads", "1", "--enable_latency_logging", "False",
                    "--log_config_file", str(BENCH / "kserve_quiet_logging.json")]
        env["KSERVE_LOGLEVEL"] = "WARNING"
    return Service(name, command, "/v2/health/ready", "/v2/models/m/infer", payloads, env)


def bare(model: str, shape: str) -> dict:
    """Best in-process cell, and two 1-thread processes side by side (the 2-worker layout's own limit)."""
    out = subprocess.run([PY, str(BENCH / "bare.py"), str(MODELS / model), shape], capture_output=True, text=True,
                         check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    pair = [subprocess.Popen([PY, str(BENCH / "bare.py"), str(MODELS / model), shape, "--single", "1,1",
                              "--seconds", "3"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    result["two_1thread_processes_samples_per_s"] = sum(
        json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1])["samples_per_s"] for p in pair)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each cell")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the best of them is kept (default 2)")
    parser.add_argument("--connections", default="1,8,64")
    parser.add_argument("--quick", action="store_true", help="3 s cells, one round: a smoke run, not a result")
    parser.add_argument("--force", action="store_true", help="run even if the machine is busy")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching systems")
    parser.add_argument("--skip-kserve", action="store_true", help="leave KServe out (no extra venv)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 3.0, 1.0, 1
    load1 = os.getloadavg()[0]
    if load1 > 1.0 and not args.force:
        print(f"make bench: the 1-minute load average is {load1:.2f} (> 1.0): another job would distort the "
              "numbers. Wait for a quiet machine, or pass --force (BENCH_ARGS=--force).", file=sys.stderr)
        return 2
    ensure_wrk()
    subprocess.run([PY, "-m", "forkless_runtime.example_models", str(MODELS)], check=True, capture_output=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = RESULTS / f"run-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    bodies = write_bodies(work)
    connections = [int(c) for c in args.connections.split(",")]

    say("bare model, in-process (best over batch 1/8/32 and 1/2 threads)")
    bare_results = {"light": bare("mlp.pt", "16"), "heavy": bare("cnn.pt", "3,64,64")}
    for kind, result in bare_results.items():
        say(f"  {kind}: {result['best_samples_per_s']:.0f} samples/s best ({result['best_cell']}), "
            f"batch-1 forward {result['batch1_latency_ms_1thread']:.3f} ms")

    services = [
        Service("ceiling", [PY, str(BENCH / "ceiling.py"), "{port}"], "/trivial", "/infer",
                ["light-json", "heavy-json", "trivial"]),
        forkless("forkless-1w", "mlp.pt", 1, False, ["light-json"]),
        forkless("forkless-1w-batch", "mlp.pt", 1, True, ["light-json", "light-binary"]),
        forkless("forkless-2w", "mlp.pt", 2, False, ["light-json"]),
        forkless("forkless-2w-batch", "mlp.pt", 2, True, ["light-json", "light-binary"]),
        forkless("forkless-heavy-1w", "cnn.pt", 1, False, ["heavy-json"], threads_per_worker="2"),
        # One worker with both cores, batching: the layout of the bare best cell (2 threads, batch 8) where
        # a CPU runs a 2-thread batch faster than two 1-thread processes.
        forkless("forkless-heavy-1w-batch", "cnn.pt", 1, True, ["heavy-json"], threads_per_worker="2"),
        forkless("forkless-heavy-2w", "cnn.pt", 2, False, ["heavy-json"]),
        forkless("forkless-heavy-2w-batch", "cnn.pt", 2, True, ["heavy-json"]),
        forkless("forkless-heavy-2w-noshm", "cnn.pt", 2, False, ["heavy-json"], shm_threshold_kb="0"),
    ]
    notes: list[str] = []
    if not args.skip_kserve:
        ensure_kserve()
        services += [
            kserve("kserve-documented", "mlp.pt", 1, False, ["light-json"]),
            kserve("kserve-best", "mlp.pt", 2, True, ["light-json"]),
            kserve("kserve-heavy-documented", "cnn.pt", 1, False, ["heavy-json"]),
            kserve("kserve-heavy-best", "cnn.pt", 2, True, ["heavy-json"]),
        ]
        crash = kserve("kserve-documented-2w", "mlp.pt", 2, False, [])
        try:
            crash.start(work)
            notes.append("KServe --workers 2 with the model loaded in load() started (unexpected)")
        except RuntimeError:
            log = (work / "kserve-documented-2w.log").read_text(errors="replace").strip().splitlines()
            cause = next((ln for ln in reversed(log) if "Error" in ln), log[-1] if log else "")
            notes.append(f"KServe 0.21 as documented with --workers 2 crashes at start-up: {cause.strip()}")
        finally:
            crash.stop()
        say(notes[-1])
    if args.only:
        wanted = args.only.split(",")
        services = [s for s in services if s.name == "ceiling" or any(w in s.name for w in wanted)]
    cells: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    total = sum(len(s.payloads) * len(connections) for s in services) * args.rounds
    done = 0
    for round_index in range(args.rounds):
        order = services if round_index % 2 == 0 else list(reversed(services))
        for service in order:
            say(f"round {round_index + 1}/{args.rounds}: {service.name}")
            service.start(work)
            try:
                for payload in service.payloads:
                    body = bodies.get(payload) or bodies["light-json"]
                    url = service.url("/trivial" if payload == "trivial" else service.infer_path)
                    for conns in connections:
                        warm = wrk(url, body, conns, args.warmup)
                        settle(conns, warm["rps"])
                        result = wrk(url, body, conns, args.duration)
                        done += 1
                        best = cells.setdefault(service.name, {}).setdefault(payload, {}).get(str(conns))
                        if best is None or result["rps"] > best["rps"]:
                            cells[service.name][payload][str(conns)] = result
                        say(f"  [{done}/{total}] {payload:12} c={conns:<3} {result['rps']:9.0f} req/s  "
                            f"p50 {result['p50_ms']:7.3f} ms  p99 {result['p99_ms']:8.3f} ms  errors {result['errors']}")
            finally:
                service.stop()

    report = summarize(cells, bare_results, connections)
    report["notes"] = notes
    report.update({
        "timestamp": stamp, "load_average_at_start": load1, "settings": vars(args),
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
    })
    (RESULTS / f"{stamp}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "latest.md").write_text(markdown(report, connections))
    plot(report, connections)
    print((RESULTS / "latest.md").read_text())
    return 0


def target_met(value: float, target: str) -> bool | None:
    """Whether ``value`` meets a target written as "<op> <number>" (">= 0.92", "<= 2"); None when informative."""
    op, _, number = target.partition(" ")
    compare = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}.get(op)
    if compare is None:
        return None
    try:
        return bool(compare(float(value), float(number)))
    except ValueError:
        return None


def summarize(cells: dict, bare_results: dict, connections: list[int]) -> dict:
    """The ratios the issues set targets for; a ratio whose systems did not run is left out."""
    top, one = str(max(connections)), str(min(connections))

    def best(prefix: str, payload: str, conns: str, key: str = "rps", pick=max) -> float | None:
        values = [c[payload][conns][key] for name, c in cells.items()
                  if name.startswith(prefix) and payload in c and conns in c[payload]]
        return pick(values) if values else None

    ratios: dict[str, dict] = {}

    def ratio(name: str, value: float | None, target: str) -> None:
        if value is not None:
            ratios[name] = {"value": value, "target": target, "met": target_met(value, target)}

    # Targets: ../shared/notes/performance.md, the raised ones where it raised them.
    heavy = best("forkless-heavy", "heavy-json", top)
    ratio("heavy_forkless_over_bare_samples_at_max_conn",
          heavy / bare_results["heavy"]["best_samples_per_s"] if heavy else None, ">= 0.92")
    ratio("heavy_forkless_over_two_1thread_bare_processes_at_max_conn",
          heavy / bare_results["heavy"]["two_1thread_processes_samples_per_s"] if heavy else None,
          "informative: the limit of the 2-worker x 1-thread layout")
    shm = cells.get("forkless-heavy-2w", {}).get("heavy-json", {}).get(top)
    inline = cells.get("forkless-heavy-2w-noshm", {}).get("heavy-json", {}).get(top)
    ratio("heavy_2w_shared_memory_over_inline", shm["rps"] / inline["rps"] if shm and inline else None,
          "informative: what the shared-memory ring buys")
    # Fairness: with batching on, the heavy model's tail at most twice its median, at no cost in throughput.
    batched = cells.get("forkless-heavy-2w-batch", {}).get("heavy-json", {}).get(top)
    ratio("heavy_batching_p99_over_p50_at_max_conn", batched["p99_ms"] / batched["p50_ms"] if batched else None, "<= 2")
    ratio("heavy_batching_over_no_batching_rps_at_max_conn",
          batched["rps"] / shm["rps"] if batched and shm else None, ">= 1.0")
    for suffix, target in (("best", ">= 1.3"), ("documented", ">= 1.6")):
        other = best(f"kserve-heavy-{suffix}", "heavy-json", top)
        ratio(f"heavy_forkless_over_kserve_{suffix}_at_max_conn", heavy / other if heavy and other else None, target)
    light_kserve = best("kserve-best", "light-json", top)
    bare_forward = bare_results["light"]["batch1_latency_ms_1thread"]
    light_p50 = best("forkless-", "light-json", one, "p50_ms", min)
    kserve_p50 = best("kserve-best", "light-json", one, "p50_ms", min)
    ratio("light_p50_at_1_conn_minus_bare_forward_ms", light_p50 - bare_forward if light_p50 else None,
          "informative: an absolute figure does not carry from one CPU to another")
    ratio("light_kserve_best_p50_at_1_conn_minus_bare_forward_ms",
          kserve_p50 - bare_forward if kserve_p50 else None, "informative")
    ratio("light_p50_overhead_over_kserve_best_overhead_at_1_conn",
          (light_p50 - bare_forward) / (kserve_p50 - bare_forward) if light_p50 and kserve_p50 and kserve_p50 > bare_forward
          else None, "<= 0.5")
    light = best("forkless-", "light-json", top)
    ceiling = best("ceiling", "light-json", top)
    ratio("light_forkless_over_frontend_ceiling_at_max_conn", light / ceiling if light and ceiling else None,
          ">= 0.5")
    ratio("light_forkless_over_kserve_best_rps_at_max_conn", light / light_kserve if light and light_kserve else None,
          ">= 3.0")
    return {"cells": cells, "bare": bare_results, "ratios": ratios}


def markdown(report: dict, connections: list[int]) -> str:
    m = report["machine"]
    lines = [
        f"# make bench — {report['timestamp']}",
        "",
        f"Machine: {m['affinity']} usable CPUs ({m['processor']}), {m['platform']}, Python {m['python']}; "
        f"1-minute load at start {report['load_average_at_start']:.2f}. "
        f"{report['settings']['duration']:g} s per cell after {report['settings']['warmup']:g} s warm-up, best of "
        f"{report['settings']['rounds']} round(s), wrk -t1, batch-1 V2 bodies.",
        "",
        "## Ratios",
        "| ratio | value | target | verdict |",
        "|---|---|---|---|",
    ]
    verdicts = {True: "met", False: "MISSED", None: ""}
    for name, ratio in report["ratios"].items():
        lines.append(f"| {name} | {ratio['value']:.3f} | {ratio['target']} | {verdicts[ratio.get('met')]} |")
    b = report["bare"]
    lines += [
        "",
        "## Bare model (in-process)",
        "| model | best samples/s | best cell | two 1-thread processes | batch-1 forward, 1 thread |",
        "|---|---|---|---|---|",
        *(f"| {k} | {v['best_samples_per_s']:.0f} | {v['best_cell']} | {v['two_1thread_processes_samples_per_s']:.0f} | "
          f"{v['batch1_latency_ms_1thread']:.3f} ms |" for k, v in b.items()),
        "",
        "## Served (requests/s = samples/s at batch 1; p50 / p99 in ms)",
        "| system | payload | " + " | ".join(f"c={c}" for c in connections) + " |",
        "|---|---|" + "---|" * len(connections),
    ]
    for system, payloads in report["cells"].items():
        for payload, by_conn in payloads.items():
            row = [f"{by_conn[str(c)]['rps']:.0f} ({by_conn[str(c)]['p50_ms']:.2f} / {by_conn[str(c)]['p99_ms']:.2f})"
                   + (f" ⚠ {by_conn[str(c)]['errors']} errors" if by_conn[str(c)]["errors"] else "")
                   for c in connections]
            lines.append(f"| {system} | {payload} | " + " | ".join(row) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", *(f"- {note}" for note in report["notes"])]
    lines += ["", "![requests/s](latest-rps.png) ![p99](latest-p99.png)", ""]
    return "\n".join(lines)


def plot(report: dict, connections: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, label, filename in (("rps", "requests/s", "latest-rps.png"), ("p99_ms", "p99 latency (ms)", "latest-p99.png")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for axis, payload in zip(axes, ("light-json", "heavy-json"), strict=True):
            for system, payloads in report["cells"].items():
                if payload in payloads:
                    axis.plot(connections, [payloads[payload][str(c)][metric] for c in connections], marker="o", label=system)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("connections")
            axis.set_ylabel(label)
            axis.set_title(payload)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / filename, dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
