"""Soak with faults and overload, short forms of what `make reliability` runs for longer.

Soak: steady load while a worker is SIGKILLed every few seconds; nothing may hang, the front-end's
memory stays flat. Overload: 3x capacity on a handler of known service time; accepted requests
keep a bounded latency, the excess is refused at once with 503 + Retry-After, and the server is
back to normal as soon as the load drops.
"""

from __future__ import annotations

import time

import pytest

from .scenarios import overload, soak

RSS_GROWTH_BOUND_MIB = 30


@pytest.mark.slow
def test_soak_with_a_worker_killed_every_few_seconds(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"), "--workers", "2",
                   "--request-timeout-s", "20")
    result = soak(server, duration=14, clients=4, kill_every=3.0, client_timeout=30, warmup=4)
    assert result.hung == 0
    assert not result.other, result.other
    assert result.kills >= 3
    assert result.ok > 0.9 * result.sent, result
    assert result.rss_growth_mib < RSS_GROWTH_BOUND_MIB, result
    deadline = time.monotonic() + 60
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(server.worker_pids()) == 2, "a killed worker was not replaced"
    assert server.metric("forkless_worker_restarts_total") >= result.kills
    assert server.client.get("/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_overload_at_three_times_capacity_is_refused_fast_and_recovers_at_once(serve):
    workers, service_s, max_queue = 2, 0.02, 8
    server = serve("--model-name", "slow", "--format", "python", "--handler", "handlers:Doubler",
                   "--workers", str(workers), "--max-batch-size", "1", "--max-queue", str(max_queue),
                   env={"TEST_HANDLER_DELAY_S": str(service_s)})
    # A stall of the machine itself (another process's burst on 2 cores; CI saw a p99 of 486 ms once,
    # right after the Ray pods' teardown) is measured again once; a queue that is not bounded misses twice.
    for _ in range(2):
        result = overload(server, workers, service_s, max_queue, seconds=4)
        if result.phases[1].summary()["ok_p99_ms"] < result.latency_bound_ms + 150:
            break
    warm, hot, after = result.phases
    for phase in result.phases:
        assert phase.hung == 0 and not phase.other, phase.summary()
    assert hot.refused > 0.3 * hot.sent, hot.summary()  # 3x capacity: about two thirds must be refused
    assert hot.refused_without_retry_after == 0
    summary = hot.summary()
    # Refusals cost no queueing: a fraction of one service time, allowing for a busy 2-core machine.
    assert summary["refused_p50_ms"] < 50, summary
    # Accepted requests wait at most for the bounded queue ahead of them (plus scheduling slack).
    assert summary["ok_p99_ms"] < result.latency_bound_ms + 150, (summary, result.latency_bound_ms)
    assert summary["served_rps"] > 0.7 * result.capacity_rps, summary
    # Recovery: under capacity again, nothing refused and latency back near the service time.
    assert after.refused == 0, after.summary()
    assert after.summary()["ok_p99_ms"] < 5 * service_s * 1000 + 100, after.summary()
    assert warm.refused == 0
    assert result.rss_peak_mib - result.rss_before_mib < RSS_GROWTH_BOUND_MIB
