"""Errors the front-end answers with, each carrying its HTTP status."""

from __future__ import annotations


class ServingError(Exception):
    status = 500
    retry_after: int | None = None


class QueueFull(ServingError):
    status = 503
    retry_after = 1


class Draining(ServingError):
    status = 503
    retry_after = 1


class NotReady(ServingError):
    status = 503
    retry_after = 1


class WorkerDied(ServingError):
    status = 503
    retry_after = 1


class RequestTimeout(ServingError):
    status = 504


class ClientGone(ServingError):
    """The client hung up while its request waited in the queue: dropped before any worker ran it.
    499 is nginx's "client closed request"; nobody reads the answer, the metrics count it."""

    status = 499


class ModelError(ServingError):
    status = 500


class AnsweredError(ServingError):
    """An error status the model's own serving code chose (a KServe model's exception handlers):
    passed on with its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnknownModel(ServingError):
    """Worded as Triton words it: tritonclient and Triton users' scripts look for this text."""

    status = 404

    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"Request for unknown model: '{name}' is not found; this server serves "
                         f"{', '.join(repr(n) for n in served)}")
