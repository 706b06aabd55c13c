"""`make reliability`: fuzz, soak with faults and overload against real servers; writes bench/results/reliability.md.

The same scenarios as tests/reliability (short forms there), run longer: thousands of fuzzed
requests, a soak of --soak-s seconds with a worker SIGKILLed every --kill-every-s seconds, and
--overload-s seconds at 3x the capacity of a handler of known service time.

    python bench/reliability.py [--soak-s 60] [--fuzz-examples 400] [--overload-s 10]
    python bench/reliability.py --duration 600     # a longer soak
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability.scenarios import (  # noqa: E402 - after the path is set
    FuzzResult,
    OverloadResult,
    SoakResult,
    fuzz,
    overload,
    soak,
)
from tests.runtime.conftest import start_server, write_onnx_linear  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "reliability.md"
RSS_GROWTH_BOUND_MIB = 30


def build_models(directory: Path) -> None:
    subprocess.run([sys.executable, "-m", "forkless_runtime.example_models", str(directory)], check=True,
                   capture_output=True)
    write_onnx_linear(directory / "linear.onnx")


def run_fuzz(work: Path, models: Path, examples: int) -> list[tuple[str, FuzzResult, bool]]:
    runs = []
    for seed, (label, args) in enumerate((
        ("TorchScript MLP", ["--model-name", "mlp", "--model-uri", str(models / "mlp.pt")]),
        ("python handler (Doubler)", ["--model-name", "doubler", "--format", "python", "--handler", "handlers:Doubler"]),
    )):
        server = start_server(work, *args)
        try:
            print(f"fuzz: {label}, {examples} examples per operation and mode", flush=True)
            result = fuzz(server.url, examples, seed=seed)
            alive = server.process.poll() is None and server.client.get("/v2/health/ready").status_code == 200
            alive = alive and "Exception in ASGI application" not in server.log()
        finally:
            server.stop()
        runs.append((label, result, alive))
    return runs


def run_soak(work: Path, models: Path, seconds: float, kill_every: float, clients: int) -> tuple[SoakResult, int]:
    server = start_server(work, "--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--workers", "2",
                          "--request-timeout-s", "20")
    try:
        print(f"soak: {seconds:g} s, {clients} clients, a worker SIGKILLed every {kill_every:g} s", flush=True)
        result = soak(server, seconds, clients=clients, kill_every=kill_every, client_timeout=30,
                      warmup=min(10.0, seconds * 0.2))
        deadline = time.monotonic() + 60
        while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers_back = len(server.worker_pids())
    finally:
        server.stop()
    return result, workers_back


def run_overload(work: Path, seconds: float) -> OverloadResult:
    workers, service_s, max_queue = 2, 0.02, 8
    server = start_server(work, "--model-name", "slow", "--format", "python", "--handler", "handlers:Doubler",
                          "--workers", str(workers), "--max-batch-size", "1", "--max-queue", str(max_queue),
                          env={"TEST_HANDLER_DELAY_S": str(service_s)})
    try:
        print(f"overload: {seconds:g} s at 3x the capacity of {workers} workers x {service_s * 1000:g} ms", flush=True)
        return overload(server, workers, service_s, max_queue, seconds=seconds)
    finally:
        server.stop()


def verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def report(args: argparse.Namespace, fuzz_runs: list[tuple[str, FuzzResult, bool]], soak_result: SoakResult,
           workers_back: int, over: OverloadResult) -> tuple[str, bool]:
    load = os.getloadavg()[0]
    lines = [
        "# Reliability: fuzz, faults, overload",
        "",
        f"`make reliability` (`bench/reliability.py`), {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} with {os.cpu_count()} CPUs, 1-minute load {load:.1f} at the end "
        "(the machine is shared: latencies carry that noise). Each scenario runs a real `forkless-runtime serve`.",
        "",
        "## Fuzzing from the server's own OpenAPI document (schemathesis 4.32.5)",
        "",
        f"Every operation of `GET /openapi.json`, positive and negative generation, {args.fuzz_examples} examples "
        "each (fewer where the space is smaller). A 5xx other than the documented 503/504 is a server error, unless it "
        "is the model raising on a request the codecs accept (counted apart: the message is the model's). Every answer "
        "is also checked against the document (status, content type, headers, body schema).",
        "",
        "| server | requests | by status | undocumented 5xx | model 500s | spec mismatches | no answer | ready after | verdict |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    passed = True
    for label, result, alive in fuzz_runs:
        ok = alive and not result.server_errors and not result.transport_errors and not result.spec_mismatches
        passed = passed and ok
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(result.by_status.items()))
        lines.append(f"| {label} | {result.requests} | {statuses} | {len(result.server_errors)} | "
                     f"{len(result.model_errors)} | {len(result.spec_mismatches)} | {len(result.transport_errors)} | "
                     f"{'yes' if alive else 'NO'} | {verdict(ok)} |")
    examples = [e for _, r, _ in fuzz_runs for e in r.model_errors][:3]
    if examples:
        lines += ["", "Model 500s seen (well-formed requests the model cannot compute), for example:", ""]
        lines += [f"- `{e[:300]}`" for e in examples]
    problems = [e for _, r, _ in fuzz_runs for e in (*r.server_errors, *r.spec_mismatches, *r.transport_errors)][:10]
    if problems:
        lines += ["", "Problems:", ""] + [f"- `{p[:300]}`" for p in problems]

    s = soak_result
    soak_ok = (s.hung == 0 and not s.other and s.ready_at_end and workers_back == 2
               and s.rss_growth_mib < RSS_GROWTH_BOUND_MIB)
    passed = passed and soak_ok
    lines += [
        "",
        "## Soak with faults",
        "",
        f"{s.clients} closed-loop client threads (httpx, 30 s timeout) post a 4x16 FP32 V2 request to the TorchScript "
        f"MLP on 2 workers for {s.seconds:.0f} s; every {args.kill_every_s:g} s a ready worker (pid from the server's "
        "`forkless_worker_up` metric) gets SIGKILL.",
        "",
        "| sent | 200 | 503 | other | hung | workers SIGKILLed | restarts | both workers back | ready after | p50 / p99 (200s) | verdict |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
        f"| {s.sent} | {s.ok} | {s.refused} | {dict(s.other) or 0} | {s.hung} | {s.kills} | {s.restarts} | "
        f"{'yes' if workers_back == 2 else 'NO'} | {'yes' if s.ready_at_end else 'NO'} | "
        f"{s.latency_p50_ms:.1f} / {s.latency_p99_ms:.1f} ms | {verdict(soak_ok)} |",
        "",
        f"Front-end RSS: {s.rss_start_mib:.1f} MiB at start, {s.rss_warm_mib:.1f} MiB after warm-up, "
        f"{s.rss_end_mib:.1f} MiB at the end: growth {s.rss_growth_mib:+.1f} MiB after warm-up "
        f"(bound {RSS_GROWTH_BOUND_MIB} MiB).",
    ]

    hot = over.phases[1].summary()
    after = over.phases[2].summary()
    over_ok = (all(p.hung == 0 and not p.other for p in over.phases) and over.phases[1].refused > 0
               and over.phases[1].refused_without_retry_after == 0 and over.phases[2].refused == 0
               and hot["ok_p99_ms"] < over.latency_bound_ms + 150
               and over.rss_peak_mib - over.rss_before_mib < RSS_GROWTH_BOUND_MIB)
    passed = passed and over_ok
    lines += [
        "",
        "## Overload",
        "",
        f"A python handler that sleeps {over.service_ms:g} ms a request, 2 workers, batching off, `--max-queue "
        f"{over.max_queue}`: capacity {over.capacity_rps:.0f} requests/s. Open-loop load (sent on a fixed schedule "
        "whatever the answers) from a bare asyncio client; sender lag is how late it sent, the busy machine's share. Bound on an accepted request's latency: (queue + 2 in flight per worker + 1) x "
        f"service / workers = {over.latency_bound_ms:.0f} ms.",
        "",
        "| phase | offered/s | sent | 200 | 503 | hung | served/s | 200 p50 / p99 / max | 503 p50 / p99 | sender lag p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for phase in over.phases:
        p = phase.summary()
        lines.append(f"| {p['phase']} | {p['offered_rps']} | {p['sent']} | {p['ok']} | {p['refused_503']} | {p['hung']} | "
                     f"{p['served_rps']} | {p['ok_p50_ms']} / {p['ok_p99_ms']} / {p['ok_max_ms']} ms | "
                     f"{p['refused_p50_ms']} / {p['refused_p99_ms']} ms | {p['client_lag_p99_ms']} ms |")
    lines += [
        "",
        f"Every 503 carried `Retry-After`: {'yes' if over.phases[1].refused_without_retry_after == 0 else 'NO'}. "
        f"Front-end RSS {over.rss_before_mib:.1f} MiB before, {over.rss_peak_mib:.1f} MiB at peak, "
        f"{over.rss_after_mib:.1f} MiB after. Recovery: the first phase under capacity after the overload refused "
        f"{after['refused_503']} and answered at p99 {after['ok_p99_ms']} ms. Verdict: {verdict(over_ok)}.",
        "",
        "## Safety (tests, not figures)",
        "",
        "tests/reliability/test_safety.py: a `torch.save` pickle served as TorchScript or torch.export, and a valid "
        "`.pt2` whose config marks a weight `use_pickle` (torch.export.load would unpickle it with weights_only=False), "
        "are refused without running their payload; `--handler os:system` and other non-classes are refused.",
        "",
        f"Overall: {verdict(passed)}.",
        "",
    ]
    return "\n".join(lines).replace("nan / nan ms", "-"), passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-s", "--duration", dest="soak_s", type=float, default=60,
                        help="soak duration in seconds (default 60)")
    parser.add_argument("--kill-every-s", type=float, default=3.0, help="seconds between worker SIGKILLs (default 3)")
    parser.add_argument("--clients", type=int, default=6, help="soak client threads (default 6)")
    parser.add_argument("--fuzz-examples", type=int, default=400,
                        help="examples per operation and generation mode (default 400: thousands of requests)")
    parser.add_argument("--overload-s", type=float, default=10, help="seconds per overload phase (default 10)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="forkless-reliability-") as tmp:
        work = Path(tmp)
        models = work / "models"
        build_models(models)
        fuzz_runs = run_fuzz(work, models, args.fuzz_examples)
        soak_result, workers_back = run_soak(work, models, args.soak_s, args.kill_every_s, args.clients)
        over = run_overload(work, args.overload_s)
    text, passed = report(args, fuzz_runs, soak_result, workers_back, over)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.exists():  # the operator's figures come from its chaos tests (make reliability runs them)
        previous = args.output.read_text()
        if "\n## Operator" in previous:
            text = text.rstrip() + "\n\n" + previous[previous.index("\n## Operator") + 1 :]
    args.output.write_text(text)
    print(text)
    print(f"wrote {args.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
