"""The batcher and the dispatch policy, driven directly: no event loop, no sleeps, no clock but the one given."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from forkless_runtime.batching.batcher import Batcher, Request
from forkless_runtime.errors import ClientGone, QueueFull
from forkless_runtime.pool import dispatch
from forkless_runtime.protocol.tensors import NamedTensor


class Done:
    """Stands in for the request's asyncio future: the batcher asks whether it is done, and answers a
    request whose client hung up."""

    def __init__(self, done: bool = False) -> None:
        self._done = done
        self.error: Exception | None = None

    def done(self) -> bool:
        return self._done

    def set_exception(self, error: Exception) -> None:
        self._done, self.error = True, error


def request(rows: int = 1, at: float = 0.0, width: int = 4, done: bool = False, batchable: bool = True) -> Request:
    tensor = NamedTensor("x", np.zeros((rows, width), dtype=np.float32))
    return Request([tensor], Done(done), batchable, enqueued=at)  # type: ignore[arg-type]


def test_a_lone_request_never_waits_when_no_worker_is_busy() -> None:
    batcher = Batcher(max_batch_size=8, max_delay_s=0.005, max_queue=10)
    first = request(at=0.0)
    batcher.submit(first)
    assert batcher.next_batch(now=0.0, workers_busy=False) == [first]
    assert batcher.next_batch(now=0.0, workers_busy=False) is None


def test_while_workers_are_busy_a_batch_waits_for_its_delay_then_goes() -> None:
    batcher = Batcher(max_batch_size=8, max_delay_s=0.005, max_queue=10)
    first, second = request(at=1.000), request(at=1.002)
    batcher.submit(first)
    assert batcher.next_batch(now=1.001, workers_busy=True) == pytest.approx(0.004)
    batcher.submit(second)
    assert batcher.next_batch(now=1.004, workers_busy=True) == pytest.approx(0.001)
    assert batcher.next_batch(now=1.005, workers_busy=True) == [first, second]


def test_a_full_batch_goes_at_once_and_takes_at_most_max_batch_size_samples_in_order() -> None:
    batcher = Batcher(max_batch_size=4, max_delay_s=10, max_queue=10)
    requests = [request(rows=2, at=0.0), request(rows=1, at=0.0), request(rows=2, at=0.0), request(rows=1, at=0.0)]
    for r in requests:
        batcher.submit(r)
    assert batcher.next_batch(now=0.0, workers_busy=True) == requests[:2]  # 3 samples; 3 + 2 > 4
    assert batcher.next_batch(now=0.0, workers_busy=False) == requests[2:]


def test_incompatible_requests_are_not_joined_and_end_a_batch() -> None:
    batcher = Batcher(max_batch_size=16, max_delay_s=0, max_queue=10)
    a, b, c = request(width=4), request(width=8), request(width=4)
    unbatchable = request(batchable=False)
    for r in (a, b, c, unbatchable):
        batcher.submit(r)
    assert batcher.next_batch(now=0.0, workers_busy=False) == [a]
    assert batcher.next_batch(now=0.0, workers_busy=False) == [b]
    assert batcher.next_batch(now=0.0, workers_busy=False) == [c]
    assert batcher.next_batch(now=0.0, workers_busy=False) == [unbatchable]


def test_requests_already_answered_are_dropped_not_sent() -> None:
    batcher = Batcher(max_batch_size=8, max_delay_s=0, max_queue=10)
    expired, live = request(done=True), request()
    batcher.submit(expired)
    batcher.submit(live)
    assert batcher.next_batch(now=0.0, workers_busy=False) == [live]


def test_requests_whose_client_hung_up_are_answered_499_and_never_sent() -> None:
    batcher = Batcher(max_batch_size=8, max_delay_s=0, max_queue=10)
    gone_first, live, gone_between, unknown = request(), request(), request(), request()
    gone_first.client_gone = gone_between.client_gone = lambda: True
    live.client_gone = lambda: False  # unknown: a transport that cannot tell (gRPC cancels its call instead)
    for queued in (gone_first, live, gone_between, unknown):
        batcher.submit(queued)
    assert batcher.next_batch(now=0.0, workers_busy=False) == [live, unknown]
    for dropped in (gone_first, gone_between):
        error = dropped.future.error  # type: ignore[attr-defined]
        assert isinstance(error, ClientGone) and error.status == 499
    assert live.future.error is None  # type: ignore[attr-defined]


def test_the_queue_is_bounded_and_requeued_requests_keep_their_place() -> None:
    batcher = Batcher(max_batch_size=1, max_delay_s=0, max_queue=2)
    first, second = request(), request()
    batcher.submit(first)
    batcher.submit(second)
    with pytest.raises(QueueFull):
        batcher.submit(request())
    taken = batcher.next_batch(now=0.0, workers_busy=False)
    assert taken == [first]
    batcher.requeue(taken)
    assert batcher.next_batch(now=0.0, workers_busy=False) == [first]


@dataclass
class Load:
    ready: bool = True
    samples_in_flight: int = 0
    batches_in_flight: int = 0
    oldest_sent: float = 0.0
    last_used: float = 0.0
    batch_seconds: float | None = None


def test_an_idle_worker_is_chosen_over_a_busy_one() -> None:
    busy = Load(samples_in_flight=4, batches_in_flight=1, oldest_sent=1.0, batch_seconds=0.0001)
    assert dispatch.choose([busy, Load(last_used=0.5)]) == 1


def test_a_heavy_model_gets_no_batch_while_its_workers_are_busy() -> None:
    """Members are decided when a worker can start: nothing is committed behind a running 10 ms batch."""
    heavy = Load(samples_in_flight=8, batches_in_flight=1, oldest_sent=1.0, batch_seconds=0.010)
    assert dispatch.choose([heavy, heavy]) is None
    assert dispatch.choose([Load(samples_in_flight=8, batches_in_flight=1)]) is None  # no measurement yet


def test_a_light_model_is_pipelined_one_batch_deep() -> None:
    light = Load(samples_in_flight=1, batches_in_flight=1, oldest_sent=1.0, batch_seconds=0.0002)
    assert dispatch.choose([light]) == 0
    full = Load(samples_in_flight=2, batches_in_flight=dispatch.PIPELINE_DEPTH, oldest_sent=1.0, batch_seconds=0.0002)
    assert dispatch.choose([full]) is None


def test_load_is_weighed_in_samples_and_ties_go_to_the_worker_free_first() -> None:
    one_big = Load(samples_in_flight=16, batches_in_flight=1, oldest_sent=1.0, batch_seconds=0.0001)
    one_small = Load(samples_in_flight=1, batches_in_flight=1, oldest_sent=2.0, batch_seconds=0.0001)
    assert dispatch.choose([one_big, one_small]) == 1
    early = Load(samples_in_flight=2, batches_in_flight=1, oldest_sent=1.0, batch_seconds=0.0001)
    late = Load(samples_in_flight=2, batches_in_flight=1, oldest_sent=3.0, batch_seconds=0.0001)
    assert dispatch.choose([late, early]) == 1


def test_among_idle_workers_the_warm_one_serves_and_unready_ones_never() -> None:
    assert dispatch.choose([Load(last_used=1.0), Load(last_used=5.0)]) == 1
    assert dispatch.choose([Load(ready=False, last_used=9.0), Load(last_used=1.0)]) == 1
    assert dispatch.choose([Load(ready=False)]) is None
