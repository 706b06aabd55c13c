"""Prometheus metrics of the front-end: one registry for the whole pod, aggregated over workers.

Hand-rolled on purpose: the hot path observes a few histograms per request, and a bisect into a
list costs far less than a locked client library call. Names follow Triton's where they exist.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.total += value

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines = []
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self._labels = f'model="{model}"'
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (protocol, status) -> count
        self.queue_seconds = Histogram(LATENCY_BUCKETS)
        self.inference_seconds = Histogram(LATENCY_BUCKETS)
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.worker_restarts = 0
        self.retried_requests = 0

    def render(self, queue_depth: int, workers: list[tuple[int, int | None, bool]], gpu_memory: dict[int, int],
               peak_memory: dict[int, int] | None = None) -> bytes:
        """`workers` is (slot, pid, ready) per worker slot."""
        workers_ready = sum(1 for _, _, ready in workers if ready)
        labels = self._labels
        lines = [
            "# HELP forkless_requests_total Inference requests answered, by protocol and HTTP status.",
            "# TYPE forkless_requests_total counter",
        ]
        for (protocol, status), count in sorted(self.requests.items()):
            lines.append(f'forkless_requests_total{{{labels},protocol="{protocol}",code="{status}"}} {count}')
        for name, hist, text in (
            ("forkless_queue_duration_seconds", self.queue_seconds, "Time a request waited in the batcher's queue."),
            ("forkless_inference_duration_seconds", self.inference_seconds, "Worker round trip of the batch a request rode in."),
            ("forkless_request_duration_seconds", self.request_seconds, "Total time from request body to response."),
            ("forkless_batch_size", self.batch_size, "Samples per batch sent to a worker."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.render(name, labels)]
        lines += [
            "# HELP forkless_queue_depth Requests waiting in the batcher.",
            "# TYPE forkless_queue_depth gauge",
            f"forkless_queue_depth{{{labels}}} {queue_depth}",
            "# HELP forkless_workers_ready Workers with the model loaded and serving.",
            "# TYPE forkless_workers_ready gauge",
            f"forkless_workers_ready{{{labels}}} {workers_ready}",
            "# HELP forkless_workers Worker processes configured.",
            "# TYPE forkless_workers gauge",
            f"forkless_workers{{{labels}}} {len(workers)}",
            "# HELP forkless_worker_up Whether each worker process is ready, labelled with its pid.",
            "# TYPE forkless_worker_up gauge",
            *(f'forkless_worker_up{{{labels},worker="{slot}",pid="{pid}"}} {int(ready)}' for slot, pid, ready in workers),
            "# HELP forkless_worker_restarts_total Workers replaced after they died.",
            "# TYPE forkless_worker_restarts_total counter",
            f"forkless_worker_restarts_total{{{labels}}} {self.worker_restarts}",
            "# HELP forkless_retried_requests_total Requests retried on another worker after theirs died.",
            "# TYPE forkless_retried_requests_total counter",
            f"forkless_retried_requests_total{{{labels}}} {self.retried_requests}",
        ]
        if gpu_memory:
            lines += [
                "# HELP forkless_worker_gpu_memory_bytes GPU memory reserved by each worker's CUDA caching allocator.",
                "# TYPE forkless_worker_gpu_memory_bytes gauge",
            ]
            lines += [f'forkless_worker_gpu_memory_bytes{{{labels},worker="{w}"}} {b}' for w, b in sorted(gpu_memory.items())]
        if peak_memory:
            lines += [
                "# HELP forkless_worker_peak_memory_bytes Each worker's memory peak in its warm-up batch at the largest "
                "batch size (GPU: allocator peak reserved plus the CUDA context; CPU: peak resident set).",
                "# TYPE forkless_worker_peak_memory_bytes gauge",
            ]
            lines += [f'forkless_worker_peak_memory_bytes{{{labels},worker="{w}"}} {b}' for w, b in sorted(peak_memory.items())]
        return ("\n".join(lines) + "\n").encode()
