"""Prometheus metrics of the operator, in the text exposition format, without a client library.

Three series are enough to run the operator: reconciles by outcome, errors by
reason, and a histogram of reconcile durations. ``serve`` exposes them on
``/metrics`` from a daemon thread, apart from kopf's event loop.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Registry:
    """Counters by label and one duration histogram, safe to update from handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reconciles: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.status_writes = 0
        self._bucket_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0

    def reconciled(self, outcome: str, seconds: float) -> None:
        with self._lock:
            self.reconciles[outcome] += 1
            self._bucket_counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            self._duration_sum += seconds

    def error(self, reason: str) -> None:
        with self._lock:
            self.errors[reason] += 1

    def status_written(self) -> None:
        with self._lock:
            self.status_writes += 1

    def exposition(self) -> str:
        """The metrics in Prometheus text format 0.0.4."""
        with self._lock:
            lines = [
                "# HELP forkless_operator_reconciles_total Reconciles of InferenceServices by outcome.",
                "# TYPE forkless_operator_reconciles_total counter",
                *(f'forkless_operator_reconciles_total{{outcome="{k}"}} {v}' for k, v in sorted(self.reconciles.items())),
                "# HELP forkless_operator_errors_total Reconcile errors by reason.",
                "# TYPE forkless_operator_errors_total counter",
                *(f'forkless_operator_errors_total{{reason="{k}"}} {v}' for k, v in sorted(self.errors.items())),
                "# HELP forkless_operator_status_writes_total Status updates written through /status.",
                "# TYPE forkless_operator_status_writes_total counter",
                f"forkless_operator_status_writes_total {self.status_writes}",
                "# HELP forkless_operator_reconcile_duration_seconds Time to apply an InferenceService's children.",
                "# TYPE forkless_operator_reconcile_duration_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), self._bucket_counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'forkless_operator_reconcile_duration_seconds_bucket{{le="{le}"}} {cumulative}')
            lines.append(f"forkless_operator_reconcile_duration_seconds_sum {self._duration_sum}")
            lines.append(f"forkless_operator_reconcile_duration_seconds_count {cumulative}")
        return "\n".join(lines) + "\n"


REGISTRY = Registry()


def serve(port: int, host: str = "0.0.0.0", registry: Registry = REGISTRY) -> ThreadingHTTPServer:
    """Serve /metrics on a daemon thread; returns the server (``shutdown()`` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = registry.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
