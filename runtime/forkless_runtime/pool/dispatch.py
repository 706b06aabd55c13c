"""Which worker starts the next batch: a pure function of the workers' loads, unit-tested alone.

A batch is formed only when a worker can start it, so its members are everything that arrived
until then and no request is committed to a worker that is still busy while another frees up.
The one exception pays for itself: a worker whose batches take less than `PIPELINE_BELOW_S`
(a light model, where the hop to the worker costs as much as the model) gets its next batch
while it finishes the current one, so it never idles while the front-end parses requests.
Load is counted in samples, not batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

PIPELINE_BELOW_S = 0.002
PIPELINE_DEPTH = 2


class WorkerLoad(Protocol):
    @property
    def ready(self) -> bool: ...
    @property
    def samples_in_flight(self) -> int: ...
    @property
    def batches_in_flight(self) -> int: ...
    @property
    def oldest_sent(self) -> float: ...  # when its oldest batch in flight was sent; 0 when idle
    @property
    def last_used(self) -> float: ...
    @property
    def batch_seconds(self) -> float | None: ...  # recent time the worker spent per batch; None before any


def can_start(worker: WorkerLoad) -> bool:
    """Idle, or busy with one short batch (pipelining pays only where the model is as quick as the hop)."""
    if not worker.ready:
        return False
    if worker.batches_in_flight == 0:
        return True
    return (worker.batches_in_flight < PIPELINE_DEPTH and worker.batch_seconds is not None
            and worker.batch_seconds < PIPELINE_BELOW_S)


def choose(workers: Sequence[WorkerLoad]) -> int | None:
    """The index of the worker that starts the next batch, or None when none can.

    Fewest samples in flight first, so an idle worker wins over a pipelined one. Among idle workers
    the most recently used (its caches are warm; at low load one worker keeps serving); among busy
    ones the one that will be free first (its batch was sent earliest).
    """
    best: int | None = None
    best_key: tuple[int, float] | None = None
    for index, worker in enumerate(workers):
        if not can_start(worker):
            continue
        tie = worker.oldest_sent if worker.batches_in_flight else -worker.last_used
        key = (worker.samples_in_flight, tie)
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best
