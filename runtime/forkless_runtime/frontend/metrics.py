"""Prometheus metrics of the front-end: one registry for the whole pod, aggregated over workers.

Hand-rolled on purpose: the hot path observes a few histograms per request, and a bisect into a
list costs far less than a locked client library call. Names follow Triton's where they exist.
"""

from __future__ import annotations

import time
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


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": int(seconds * 1e9)}


class Statistics:
    """Counts and durations of the statistics extension (`GET /v2/models/{name}/stats`), as Triton
    reports them: per request for success, failure and the compute phases; per batch size for the
    executions. Compute input is joining and packing a batch's inputs, compute infer the model's own
    time in its worker, compute output the rest of the round trip (transport, unpacking)."""

    def __init__(self) -> None:
        self.success = [0, 0.0]
        self.fail = [0, 0.0]
        self.compute = {"compute_input": [0, 0.0], "compute_infer": [0, 0.0], "compute_output": [0, 0.0]}
        self.by_batch_size: dict[int, list[float]] = {}  # size -> [executions, input s, infer s, output s]
        self.inference_count = 0  # samples
        self.execution_count = 0  # batches
        self.last_inference_ms = 0

    def request_done(self, ok: bool, seconds: float) -> None:
        entry = self.success if ok else self.fail
        entry[0] += 1
        entry[1] += seconds

    def batch_finished(self, requests: int, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        for key, seconds in (("compute_input", input_s), ("compute_infer", infer_s), ("compute_output", output_s)):
            self.compute[key][0] += requests
            self.compute[key][1] += seconds * requests
        row = self.by_batch_size.setdefault(size, [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += input_s
        row[2] += infer_s
        row[3] += output_s
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)

    def as_dict(self, name: str, version: str, queue: Histogram) -> dict[str, object]:
        inference_stats: dict[str, object] = {
            "success": _duration(int(self.success[0]), self.success[1]),
            "fail": _duration(int(self.fail[0]), self.fail[1]),
            "queue": _duration(queue.count, queue.total),
            **{key: _duration(int(count), seconds) for key, (count, seconds) in self.compute.items()},
            "cache_hit": _duration(0, 0.0),
            "cache_miss": _duration(0, 0.0),
        }
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": inference_stats,
            "batch_stats": [
                {"batch_size": size, "compute_input": _duration(int(row[0]), row[1]),
                 "compute_infer": _duration(int(row[0]), row[2]), "compute_output": _duration(int(row[0]), row[3])}
                for size, row in sorted(self.by_batch_size.items())
            ],
            "memory_usage": [],
        }


def merge_expositions(texts: list[bytes]) -> bytes:
    """Several models' registries as one exposition: each family's HELP and TYPE once, its samples
    from every model together (Prometheus refuses a family that appears twice)."""
    if len(texts) == 1:
        return texts[0]
    families: dict[str, list[str]] = {}
    current: list[str] = []
    for text in texts:
        for line in text.decode().splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                existing = families.get(name)
                current = existing if existing is not None else families.setdefault(name, [line])
            elif line.startswith("# TYPE "):
                if line not in current:
                    current.append(line)
            elif line:
                current.append(line)
    return ("\n".join(line for lines in families.values() for line in lines) + "\n").encode()


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
        self.stats = Statistics()

    def batch_finished(self, requests: int, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        self.stats.batch_finished(requests, size, input_s, infer_s, output_s)

    def statistics(self, version: str = "1") -> dict[str, object]:
        """This model's entry of the statistics extension, in Triton's shape."""
        return self.stats.as_dict(self.model, version, self.queue_seconds)

    def render(self, queue_depth: int, workers: list[tuple[int, int | None, bool]], gpu_memory: dict[int, int],
               peak_memory: dict[int, int] | None = None, running: int = 0) -> bytes:
        """`workers` is (slot, pid, ready) per worker slot; `running` the requests in the workers' hands."""
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
            "# HELP forkless_requests_in_flight Requests queued or running in a worker (what an autoscaler reads).",
            "# TYPE forkless_requests_in_flight gauge",
            f"forkless_requests_in_flight{{{labels}}} {queue_depth + running}",
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
