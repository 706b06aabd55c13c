"""The reliability scenarios, as plain functions over a running server: fuzz, soak with faults, overload.

Shared by the tests (short runs, with assertions) and bench/reliability.py (longer runs, with a
report); each returns its figures as a dataclass and asserts nothing itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
import psutil

from tests.runtime.conftest import Server, v2_body

MIB = 1024 * 1024
DOCUMENTED_5XX = (503, 504)


def rss(server: Server) -> int:
    """Resident memory of the front-end process (the server's own pid; workers are its children)."""
    return psutil.Process(server.process.pid).memory_info().rss


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- fuzzing ---------------------------------------------------------------------------------------
@dataclass
class FuzzResult:
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)  # undocumented 5xx: must stay empty
    model_errors: list[str] = field(default_factory=list)  # 500s from the model on well-formed requests
    spec_mismatches: list[str] = field(default_factory=list)  # answers the OpenAPI document does not describe
    transport_errors: list[str] = field(default_factory=list)  # no answer at all: must stay empty
    seconds: float = 0.0


def _well_formed_model_error(case: Any, response: Any) -> bool:
    """A 500 is the model's when the request decodes cleanly and the body says what the model raised.

    The codecs are the front-end's own (pure functions): if they accept the request, the server has
    nothing more to check without the model, and the 500 carries the model's message.
    """
    from forkless_runtime.protocol import v1, v2
    from forkless_runtime.protocol.tensors import ProtocolError

    try:
        message = response.json()["error"]
    except Exception:
        return False
    if not isinstance(message, str) or not message:
        return False
    body = response.request.body or b""
    if isinstance(body, str):
        body = body.encode()
    try:
        if case.path.endswith(":predict"):
            v1.decode_request(body, [])
        else:
            length = response.request.headers.get("Inference-Header-Content-Length")
            v2.decode_request(body, int(length) if length is not None else None)
    except (ProtocolError, ValueError):
        return False
    return True


def fuzz(url: str, examples: int, seed: int = 0) -> FuzzResult:
    """Generate requests for every operation of the server's own /openapi.json, positive and negative.

    Every answer is classified: a 5xx other than the documented 503/504 is a server error, unless
    it is the model raising on a well-formed request (counted apart); an answer the document does
    not describe (status, content type, body schema) is a spec mismatch.
    """
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi import checks

    document = httpx.get(url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    conformance = [checks.status_code_conformance, checks.content_type_conformance,
                   checks.response_schema_conformance, checks.response_headers_conformance]
    result = FuzzResult()
    session = requests.Session()
    started = time.monotonic()
    for operation in schema.get_all_operations():
        op = operation.ok()
        has_inputs = bool(op.path_parameters or op.headers or op.query or op.body)
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if has_inputs else [GenerationMode.POSITIVE]
        for mode in modes:
            @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck),
                      phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            @hypothesis.seed(seed)
            def one(case: Any) -> None:
                result.requests += 1
                try:
                    response = case.call(base_url=url, session=session, timeout=30)
                except requests.RequestException as exc:
                    result.transport_errors.append(f"{case.as_curl_command()}: {exc}")
                    return
                status = response.status_code
                result.by_status[status] += 1
                if status >= 500 and status not in DOCUMENTED_5XX:
                    where = result.model_errors if _well_formed_model_error(case, response) else result.server_errors
                    where.append(f"{case.as_curl_command()} -> {status} {response.text[:200]}")
                try:
                    case.validate_response(response, checks=conformance)
                except Exception as exc:
                    result.spec_mismatches.append(f"{case.operation.label} -> {status}: {str(exc).splitlines()[0][:200]}")

            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                one()
    result.seconds = time.monotonic() - started
    return result


# --- soak with faults -----------------------------------------------------------------------------
@dataclass
class SoakResult:
    seconds: float
    clients: int
    sent: int
    ok: int
    refused: int  # 503
    other: collections.Counter
    hung: int  # no answer within the client timeout: must be zero
    kills: int
    restarts: int
    ready_at_end: bool
    rss_start_mib: float
    rss_warm_mib: float
    rss_end_mib: float
    latency_p50_ms: float
    latency_p99_ms: float

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_warm_mib


def soak(server: Server, duration: float, clients: int = 6, kill_every: float = 3.0,
         client_timeout: float = 30.0, warmup: float | None = None) -> SoakResult:
    """Closed-loop load from `clients` threads while a ready worker is SIGKILLed every `kill_every` s."""
    x = np.linspace(-1, 1, 16 * 4, dtype=np.float32).reshape(4, 16)
    body = v2_body(x)
    path = f"/v2/models/{_model_name(server)}/infer"
    stop = threading.Event()
    lock = threading.Lock()
    counts: collections.Counter = collections.Counter()
    latencies: list[float] = []
    warmup = duration * 0.2 if warmup is None else warmup

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=client_timeout) as http:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status: int | str = http.post(path, json=body).status_code
                except httpx.TimeoutException:
                    status = "hung"
                except httpx.TransportError as exc:
                    status = f"transport:{type(exc).__name__}"
                with lock:
                    counts[status] += 1
                    if status == 200:
                        latencies.append(time.perf_counter() - started)

    restarts_before = server.metric("forkless_worker_restarts_total")
    rss_start = rss(server)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    kills = 0
    began = time.monotonic()
    next_kill = began + kill_every
    rss_warm = None
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        while (now := time.monotonic()) < began + duration:
            if rss_warm is None and now >= began + warmup:
                rss_warm = rss(server)
            if now >= next_kill:
                pids = _ready_worker_pids(probe)
                if pids:
                    victim = pids[kills % len(pids)]
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                        kills += 1
                next_kill = now + kill_every
            time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(client_timeout + 5)
    elapsed = time.monotonic() - began
    rss_end = rss(server)
    ready = server.client.get("/v2/health/ready").status_code == 200
    other = collections.Counter({k: v for k, v in counts.items() if k not in (200, 503, "hung")})
    return SoakResult(
        seconds=elapsed, clients=clients, sent=sum(counts.values()), ok=counts[200], refused=counts[503],
        other=other, hung=counts["hung"], kills=kills,
        restarts=int(server.metric("forkless_worker_restarts_total") - restarts_before), ready_at_end=ready,
        rss_start_mib=rss_start / MIB, rss_warm_mib=(rss_warm or rss_start) / MIB, rss_end_mib=rss_end / MIB,
        latency_p50_ms=percentile(latencies, 50) * 1000, latency_p99_ms=percentile(latencies, 99) * 1000,
    )


def _model_name(server: Server) -> str:
    return server.client.get("/openapi.json").json()["paths"]["/v2/models/{name}"]["get"]["parameters"][0][
        "schema"]["enum"][0]


def _ready_worker_pids(client: httpx.Client) -> list[int]:
    pids = []
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("forkless_worker_up{") and line.endswith(" 1"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            pids.append(int(labels["pid"].strip('"')))
    return sorted(pids)


# --- overload ------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    offered_rps: float
    seconds: float
    sent: int = 0
    ok: int = 0
    refused: int = 0
    refused_without_retry_after: int = 0
    other: collections.Counter = field(default_factory=collections.Counter)
    hung: int = 0
    ok_latencies: list[float] = field(default_factory=list)
    refused_latencies: list[float] = field(default_factory=list)
    began: float = 0.0
    last_answer: float = 0.0
    client_lag_p99_ms: float = 0.0  # how late the generator sent (a busy machine): large values void the figures

    def summary(self) -> dict[str, Any]:
        return {
            "phase": self.name, "offered_rps": round(self.offered_rps), "seconds": round(self.seconds, 1),
            "sent": self.sent, "ok": self.ok, "refused_503": self.refused, "hung": self.hung,
            "other": dict(self.other), "client_lag_p99_ms": round(self.client_lag_p99_ms, 1),
            "served_rps": round(self.ok / (self.last_answer - self.began), 1) if self.last_answer > self.began else 0,
            "ok_p50_ms": round(percentile(self.ok_latencies, 50) * 1000, 1),
            "ok_p99_ms": round(percentile(self.ok_latencies, 99) * 1000, 1),
            "ok_max_ms": round(max(self.ok_latencies, default=float("nan")) * 1000, 1),
            "refused_p50_ms": round(percentile(self.refused_latencies, 50) * 1000, 1),
            "refused_p99_ms": round(percentile(self.refused_latencies, 99) * 1000, 1),
        }


@dataclass
class OverloadResult:
    capacity_rps: float
    service_ms: float
    max_queue: int
    phases: list[Phase]
    rss_before_mib: float
    rss_peak_mib: float
    rss_after_mib: float
    latency_bound_ms: float


async def _post(idle: list, port: int, request: bytes) -> tuple[int, bool]:
    """One HTTP/1.1 request on a kept-alive connection: (status, has Retry-After).

    A bare asyncio client rather than httpx: at 3x capacity the load generator must cost far less
    than the server it measures, or its own event loop's lag shows up as server latency.
    """
    reader, writer = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length, retry_after = 0, False
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"retry-after":
                retry_after = True
        await reader.readexactly(length)
    except BaseException:
        writer.close()
        raise
    idle.append((reader, writer))
    return int(head.split(b" ", 2)[1]), retry_after


async def _open_loop(port: int, path: str, body: dict, phase: Phase, client_timeout: float) -> None:
    """Send at `offered_rps` on a fixed schedule whatever the answers (open loop), wait for every answer."""
    payload = orjson.dumps(body)
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    idle: list = []
    lags: list[float] = []

    async def one(scheduled: float) -> None:
        started = time.perf_counter()
        lags.append(started - scheduled)
        try:
            status, retry_after = await asyncio.wait_for(_post(idle, port, request), client_timeout)
        except TimeoutError:
            phase.hung += 1
            return
        except OSError as exc:
            phase.other[f"transport:{type(exc).__name__}"] += 1
            return
        took = time.perf_counter() - started
        phase.last_answer = max(phase.last_answer, time.perf_counter())
        if status == 200:
            phase.ok += 1
            phase.ok_latencies.append(took)
        elif status == 503:
            phase.refused += 1
            phase.refused_latencies.append(took)
            phase.refused_without_retry_after += not retry_after
        else:
            phase.other[status] += 1

    tasks = []
    interval = 1 / phase.offered_rps
    began = time.perf_counter()
    phase.began = began
    for i in range(int(phase.offered_rps * phase.seconds)):
        scheduled = began + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
        phase.sent += 1
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    phase.client_lag_p99_ms = percentile(lags, 99) * 1000


def overload(server: Server, workers: int, service_s: float, max_queue: int, seconds: float = 5.0,
             factor: float = 3.0, client_timeout: float = 30.0) -> OverloadResult:
    """Offer `factor` x capacity, then half of it: accepted latency, refusals, memory, recovery."""
    capacity = workers / service_s
    body = v2_body(np.ones((1, 4), dtype=np.float32))
    path = f"/v2/models/{_model_name(server)}/infer"
    phases = [Phase("warm-up at 0.5x", capacity * 0.5, min(2.0, seconds)),
              Phase(f"overload at {factor:g}x", capacity * factor, seconds),
              Phase("recovery at 0.5x", capacity * 0.5, seconds)]
    rss_before = rss(server)
    peak = [rss_before]
    done = threading.Event()

    def watch_memory() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss(server))

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    try:
        for phase in phases:
            asyncio.run(_open_loop(server.port, path, body, phase, client_timeout))
    finally:
        done.set()
        watcher.join()
    # A request waits for the queue ahead of it and the batches already in flight (two per worker).
    bound = (max_queue + 2 * workers + 1) * service_s / workers
    return OverloadResult(capacity_rps=capacity, service_ms=service_s * 1000, max_queue=max_queue, phases=phases,
                          rss_before_mib=rss_before / MIB, rss_peak_mib=peak[0] / MIB, rss_after_mib=rss(server) / MIB,
                          latency_bound_ms=bound * 1000)
