"""The central dynamic batcher: a bounded FIFO of requests, drained into batches for idle workers.

A batch goes to a worker when one is idle and either the batch is full, the oldest request has
waited `max_delay`, or nothing is in flight anywhere (so a lone request never waits out the
delay). Under load, requests pile up while every worker is busy, and the next idle worker takes
up to `max_batch_size` samples of them at once: the worker hop is paid once per batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

import numpy as np

from ..errors import QueueFull
from ..protocol.tensors import NamedTensor


class Request:
    """One inference request on its way through the batcher to a worker and back."""

    __slots__ = ("deadline", "enqueued", "future", "inputs", "key", "retried", "size", "timer")

    def __init__(self, inputs: list[NamedTensor], future: asyncio.Future, batchable: bool) -> None:
        self.inputs = inputs
        self.future = future
        self.enqueued = time.perf_counter()
        self.retried = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # wall-clock time.time(), comparable in the worker process
        first = inputs[0].array
        size = first.shape[0] if first.ndim else -1
        if batchable and size >= 0 and all(t.array.ndim and t.array.shape[0] == size for t in inputs):
            self.size = size
            self.key: object = tuple((t.name, t.array.dtype.str, t.array.shape[1:]) for t in inputs)
        else:  # a request that cannot be concatenated with others rides alone
            self.size = max(size, 1)
            self.key = object()


class Dispatcher(Protocol):
    def idle_worker(self) -> object | None: ...
    def busy(self) -> bool: ...
    def send(self, worker: object, requests: list[Request]) -> None: ...


class Batcher:
    def __init__(self, max_batch_size: int, max_delay_s: float, max_queue: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.queue: deque[Request] = deque()
        self.dispatcher: Dispatcher | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.queue)

    def submit(self, request: Request) -> None:
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.queue.append(request)
        self.pump()

    def requeue(self, requests: list[Request]) -> None:
        """Put requests back at the head (their worker died); they keep their place in line."""
        self.queue.extendleft(reversed(requests))
        self.pump()

    def pump(self) -> None:
        dispatcher = self.dispatcher
        if dispatcher is None:
            return
        queue = self.queue
        while queue:
            while queue and queue[0].future.done():  # timed out while waiting
                queue.popleft()
            if not queue:
                return
            worker = dispatcher.idle_worker()
            if worker is None:
                return
            if self.max_delay_s > 0 and dispatcher.busy() and not self._full():
                waited = time.perf_counter() - queue[0].enqueued
                if waited < self.max_delay_s:
                    self._wake_in(self.max_delay_s - waited)
                    return
            dispatcher.send(worker, self._take())

    def _full(self) -> bool:
        head = self.queue[0]
        total = 0
        for request in self.queue:
            if request.key is not head.key and request.key != head.key:
                return True  # the batch cannot grow past an incompatible request
            total += request.size
            if total >= self.max_batch_size:
                return True
        return False

    def _take(self) -> list[Request]:
        queue = self.queue
        head = queue.popleft()
        batch = [head]
        total = head.size
        while queue and total < self.max_batch_size:
            nxt = queue[0]
            if nxt.future.done():
                queue.popleft()
                continue
            if (nxt.key is not head.key and nxt.key != head.key) or total + nxt.size > self.max_batch_size:
                break
            batch.append(queue.popleft())
            total += nxt.size
        return batch

    def _wake_in(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def fail_all(self, error: Exception) -> None:
        while self.queue:
            request = self.queue.popleft()
            if not request.future.done():
                request.future.set_exception(error)


def concatenate(requests: list[Request]) -> list[tuple[str, list[np.ndarray]]]:
    """Per input, the arrays of every request in the batch, to be joined along dimension 0."""
    head = requests[0].inputs
    return [(tensor.name, [r.inputs[i].array for r in requests]) for i, tensor in enumerate(head)]
