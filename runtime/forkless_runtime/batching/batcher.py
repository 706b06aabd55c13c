"""The dynamic batcher: a bounded FIFO of requests and the rule that cuts a batch from its head.

It is passive: the pool asks for a batch only when a worker can start one (the pool owns every
scheduling decision), so a batch's members are chosen at the last moment, from everything that
arrived until then. It never calls out, keeps no clock of its own (``now`` is given), and needs
no event loop: the unit tests drive it directly.

The rule: take up to `max_batch_size` samples of compatible requests from the head, at once when
the batch is full, when no worker is busy (a lone request never waits out the delay), or when the
oldest request has waited `max_delay`; otherwise say how long to wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ClientGone, QueueFull
from ..protocol.tensors import NamedTensor


class Request:
    """One inference request on its way through the batcher to a worker and back."""

    __slots__ = ("client_gone", "deadline", "enqueued", "future", "inputs", "key", "parameters", "retried", "size",
                 "timer")

    def __init__(self, inputs: list[NamedTensor], future: asyncio.Future, batchable: bool,
                 enqueued: float | None = None, parameters: dict[str, Any] | None = None,
                 parameters_key: bytes = b"", client_gone: Callable[[], bool] | None = None) -> None:
        """``parameters``: what the handler gets with the batch; only requests whose ``parameters_key``
        (the parameters, serialized) are equal ride together. ``client_gone``: whether the client has
        hung up, where the transport can tell."""
        self.inputs = inputs
        self.parameters = parameters
        self.future = future
        self.enqueued = time.perf_counter() if enqueued is None else enqueued
        self.retried = False
        self.client_gone = client_gone
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # wall-clock time.time(), comparable in the worker process
        first = inputs[0].array
        size = first.shape[0] if first.ndim else -1
        if batchable and size >= 0 and len(inputs) == 1:  # the common case, without the generators below
            self.size = size
            self.key: object = (parameters_key, (inputs[0].name, first.dtype.str, first.shape[1:]))
        elif batchable and size >= 0 and all(t.array.ndim and t.array.shape[0] == size for t in inputs):
            self.size = size
            self.key = (parameters_key, *((t.name, t.array.dtype.str, t.array.shape[1:]) for t in inputs))
        else:  # a request that cannot be concatenated with others rides alone
            self.size = max(size, 1)
            self.key = object()


class Batcher:
    def __init__(self, max_batch_size: int, max_delay_s: float, max_queue: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.queue: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self.queue)

    def submit(self, request: Request) -> None:
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.queue.append(request)

    def requeue(self, requests: list[Request]) -> None:
        """Put requests back at the head (their worker died); they keep their place in line."""
        self.queue.extendleft(reversed(requests))

    def next_batch(self, now: float, workers_busy: bool) -> list[Request] | float | None:
        """The batch a worker should start now; else the seconds to wait for it to fill; None when empty.

        ``workers_busy``: some worker is running a batch, so waiting can pay off (another batch's
        worth of requests is on its way); with every worker idle a request never waits.
        """
        queue = self.queue
        while queue and dropped(queue[0]):
            queue.popleft()
        if not queue:
            return None
        if self.max_delay_s > 0 and workers_busy and not self._full():
            left = queue[0].enqueued + self.max_delay_s - now
            if left > 0:
                return left
        return self._take()

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
            if dropped(nxt):
                queue.popleft()
                continue
            if (nxt.key is not head.key and nxt.key != head.key) or total + nxt.size > self.max_batch_size:
                break
            batch.append(queue.popleft())
            total += nxt.size
        return batch

    def fail_all(self, error: Exception) -> None:
        while self.queue:
            request = self.queue.popleft()
            if not request.future.done():
                request.future.set_exception(error)


def dropped(request: Request) -> bool:
    """Whether a queued request no longer needs a worker: answered already (timed out, cancelled: a gRPC
    client that cancels cancels its call), or its HTTP client hung up. The latter is answered ClientGone
    here so that it is counted; a client that gave up (a timeout, a load generator stopping) then costs
    no worker time, and the requests queued behind it are not delayed by work nobody will read."""
    if request.future.done():
        return True
    if request.client_gone is not None and request.client_gone():
        request.future.set_exception(ClientGone("the client closed the connection before a worker took its request"))
        return True
    return False


def concatenate(requests: list[Request]) -> list[tuple[str, list[np.ndarray]]]:
    """Per input, the arrays of every request in the batch, to be joined along dimension 0."""
    head = requests[0].inputs
    return [(tensor.name, [r.inputs[i].array for r in requests]) for i, tensor in enumerate(head)]
