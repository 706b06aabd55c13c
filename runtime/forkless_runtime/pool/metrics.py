"""What the pool records, as an interface: the front-end's registry provides it, and the pool never
imports the front-end. `NullMetrics` serves where nothing is exported (`forkless-runtime check`)."""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def observe(self, value: float) -> None: ...


class PoolMetrics(Protocol):
    @property
    def queue_seconds(self) -> Observer: ...  # time a request waited before its batch was sent
    @property
    def inference_seconds(self) -> Observer: ...  # a batch's round trip through its worker
    @property
    def batch_size(self) -> Observer: ...  # samples per batch
    retried_requests: int
    worker_restarts: int

    def batch_finished(self, requests: int, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """A batch of ``requests`` requests and ``size`` samples came back: seconds joining and packing its inputs, in the model (the worker's own
        measure), and the rest of the round trip (transport both ways and unpacking the outputs)."""


class _Discard:
    def observe(self, value: float) -> None:
        pass


class NullMetrics:
    def __init__(self) -> None:
        self.queue_seconds = self.inference_seconds = self.batch_size = _Discard()
        self.retried_requests = 0
        self.worker_restarts = 0

    def batch_finished(self, requests: int, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        pass
