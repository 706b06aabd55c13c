"""The worker pool: spawns model workers, owns every scheduling decision, heals crashes.

Runs inside the front-end's event loop and never imports torch (nor the worker's code: it spawns
`channel.worker_entry`, which imports the worker module in the child). Each worker is a process
started with `spawn` or `forkserver` and a socket pair. `pump()` is the one place where batches
are formed and sent: when a worker can start one (`dispatch.choose`), it asks the batcher for
the batch to start now. A dead worker's in-flight requests are retried once on another worker
(inference is idempotent) or answered 503, never left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..batching.batcher import Batcher, Request, concatenate
from ..channel import (
    ERR,
    FRAME_SIZE,
    LOAD_ERROR,
    OK,
    READY,
    ShmRing,
    WorkerSpec,
    decode_frame,
    infer_message,
    pack_tensors,
    stop_message,
    unpack_tensors,
    worker_entry,
)
from ..errors import ModelError, WorkerDied
from ..precision import precision_problem
from ..protocol.tensors import NamedTensor
from ..settings import Settings
from . import dispatch
from .auto import CUDA_CONTEXT_BYTES, decide, memory_limit_bytes
from .metrics import PoolMetrics
from .resources import default_threads, usable_cpus, visible_gpus

log = logging.getLogger("forkless.pool")

RING_BYTES = 64 * 1024 * 1024
MAX_BACKOFF_S = 30.0
BATCH_SECONDS_WEIGHT = 0.2  # of the newest batch in a worker's running average of its batch time


def died_while_loading(exitcode: int | None) -> str:
    """Why a worker vanished before it reported: a SIGKILL while loading is almost always the kernel's
    OOM killer (the container's memory limit, or the node's), which says so nowhere else."""
    if exitcode == -signal.SIGKILL:
        return ("the worker process was killed (SIGKILL) while loading the model: most likely out of memory "
                "(the container's memory limit or the node's); give it more memory or load a smaller model")
    code = f" (exit code {exitcode})" if exitcode is not None else ""
    return f"the worker process died while loading the model{code}; see its log above"


class _Channel(asyncio.Protocol):
    """Reads length-prefixed frames from a worker's socket and hands them to the pool."""

    def __init__(self, on_frame: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self._buffer = bytearray()
        self._on_frame = on_frame
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (size,) = FRAME_SIZE.unpack_from(buffer, start)
            if end - start - 4 < size:
                break
            frame = bytes(buffer[start + 4 : start + 4 + size])
            start += 4 + size
            self._on_frame(frame)
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()

    def send(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(FRAME_SIZE.pack(len(frame)) + frame)


class _Batch:
    __slots__ = ("allocations", "id", "input_s", "requests", "sent", "size")

    def __init__(self, batch_id: int, requests: list[Request], allocations: list[int], size: int) -> None:
        self.id = batch_id
        self.requests = requests
        self.allocations = allocations
        self.size = size
        self.sent = time.perf_counter()
        self.input_s = 0.0  # joining and packing the inputs


class Worker:
    """The front-end's handle on one worker slot; the process behind it is replaced when it dies."""

    def __init__(self, slot: int, spec: WorkerSpec, ring: ShmRing | None) -> None:
        self.slot = slot
        self.spec = spec
        self.ring = ring
        self.process: Any = None
        self.channel: _Channel | None = None
        self.ready = False
        self.stopping = False
        self.inflight: dict[int, _Batch] = {}  # in the order sent
        self.samples_in_flight = 0
        self.last_used = 0.0
        self.batch_seconds: float | None = None
        self.load_failures = 0
        self.crashes = 0
        self.last_error: str | None = None
        self.gpu_memory: int | None = None
        self.peak_memory: int | None = None  # measured by the worker's warm-up at the largest batch
        self.pid: int | None = None

    # The load dispatch.choose reads.
    @property
    def batches_in_flight(self) -> int:
        return len(self.inflight)

    @property
    def oldest_sent(self) -> float:
        return next(iter(self.inflight.values())).sent if self.inflight else 0.0

    def record_batch_time(self, seconds: float) -> None:
        previous = self.batch_seconds
        self.batch_seconds = seconds if previous is None else previous + BATCH_SECONDS_WEIGHT * (seconds - previous)


class ModelSettingsRefused(RuntimeError):
    """The settings cannot serve this model on this machine (e.g. fp16 without a GPU): no worker starts,
    and the server exits with the reason as a load failure instead of retrying what cannot work."""


class WorkerPool:
    def __init__(self, settings: Settings, batcher: Batcher, metrics: PoolMetrics,
                 on_fatal: Callable[[str], None], models_sharing: int = 1) -> None:
        """``models_sharing``: how many models (each its own pool) share this pod's CPUs and GPUs."""
        self.settings = settings
        self.models_sharing = models_sharing
        self.batcher = batcher
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.context: Any = multiprocessing.get_context(settings.start_method)
        self.metadata: dict[str, Any] | None = None
        self.workers: list[Worker] = []
        self._next_batch = 0
        self._stopping = False
        self._restarts: set[asyncio.Task] = set()
        self._timer: asyncio.Handle | None = None  # the pump that a filling batch waits for
        self._timer_due = 0.0  # when it runs, on the loop's clock
        self.device: str = "cpu"  # set by plan()
        self.gpus: list[str] = []
        self.auto_pending = False  # --workers auto, before the first worker has reported
        self.auto_decision: str | None = None
        self._respec_first: WorkerSpec | None = None

    # --- layout: which GPU and how many threads each worker gets -------------------------
    def plan(self) -> list[WorkerSpec]:
        """The workers to start now: all of them, or with --workers auto the first, which measures."""
        settings = self.settings
        gpus = visible_gpus() if settings.device in ("auto", "cuda") else []
        if settings.device == "cuda" and not gpus:
            raise RuntimeError("--device cuda was given but no GPU is visible (CUDA_VISIBLE_DEVICES, /proc/driver/nvidia)")
        self.device, self.gpus = ("cuda" if gpus else "cpu"), gpus
        problem = precision_problem(settings.precision, self.device, settings.resolved_format)
        if problem:
            raise ModelSettingsRefused(problem)
        if settings.workers == "auto":
            if self.models_sharing > 1:
                raise ModelSettingsRefused("--workers auto measures one model alone; with several models "
                                           "give --workers a number")
            self.auto_pending = True
            return [self._spec(0, 1, settings.gpu_memory_fraction, 1)]
        count = int(settings.workers or max(1, len(gpus)))
        return [self._spec(slot, count, settings.gpu_memory_fraction, len(range(slot % len(gpus), count, len(gpus)))
                           if gpus else 1) for slot in range(count)]

    def _spec(self, slot: int, count: int, fraction: float | None, workers_on_gpu: int) -> WorkerSpec:
        settings, gpus = self.settings, self.gpus
        return WorkerSpec(
            worker_id=slot,
            format=settings.resolved_format,
            model_path=settings.model_path,
            handler=settings.handler,
            device=self.device,
            gpu=gpus[slot % len(gpus)] if gpus else None,
            workers_on_gpu=workers_on_gpu * self.models_sharing,
            threads=settings.threads_per_worker or default_threads(count * self.models_sharing),
            gpu_memory_fraction=fraction if gpus else None,
            ring_name=None,
            ring_size=RING_BYTES,
            log_format=settings.log_format,
            log_level=settings.log_level,
            precision=settings.precision,
            input_shapes=settings.input_shapes,
            max_batch_size=settings.max_batch_size,
            signature=settings.signature,
            model_name=settings.model_name,
        )

    def _add_worker(self, spec: WorkerSpec) -> Worker:
        ring = None
        try:
            if self.settings.shm_threshold_kb > 0:
                ring = ShmRing(RING_BYTES, min_bytes=int(self.settings.shm_threshold_kb * 1024))
        except OSError as exc:  # a tiny /dev/shm: tensors ride in the socket instead
            log.warning("shared memory unavailable (%s); tensors will be copied through the worker socket", exc)
        worker = Worker(spec.worker_id, WorkerSpec(**{**spec.as_dict(), "ring_name": ring.name if ring else None}), ring)
        self.workers.append(worker)
        return worker

    async def start(self) -> None:
        for spec in self.plan():
            self._add_worker(spec)
        first = self.workers[0].spec
        log.info("starting %d worker(s) with %s: device %s, %d thread(s) each%s%s", len(self.workers),
                 self.settings.start_method, first.device, first.threads,
                 f", GPUs {[w.spec.gpu for w in self.workers]}" if first.gpu is not None else "",
                 "; --workers auto: the first measures what one needs, then the rest start" if self.auto_pending else "")
        await asyncio.gather(*(self._launch(worker) for worker in self.workers))

    # --- --workers auto: grow once the first worker has measured itself ---------------------------
    def _grow(self, first: Worker, header: dict[str, Any]) -> None:
        """Decide the count from the first worker's report, start the others, and give the first the
        thread budget of the final count once another worker can serve meanwhile."""
        self.auto_pending = False
        need = header.get("peak_mem") or header.get("rss") or 0
        if self.device == "cuda":
            if not header.get("peak_mem"):
                need = (header.get("gpu_mem") or 0) + CUDA_CONTEXT_BYTES
            memory = header.get("device_mem") or 0
        else:
            memory = memory_limit_bytes()
        if not need or not memory:
            log.warning("--workers auto: the first worker reported no memory figures; serving with one worker")
            return
        decision = decide(int(need), int(memory), usable_cpus(), len(self.gpus), self.settings.gpu_memory_fraction)
        self.auto_decision = decision.reason
        log.info("--workers auto: %s", decision.reason)
        if decision.workers <= 1:
            return
        for slot in range(1, decision.workers):
            worker = self._add_worker(self._spec(slot, decision.workers, decision.gpu_memory_fraction,
                                                 decision.per_gpu or 1))
            self._spawn_task(self._launch(worker))
        final = self._spec(0, decision.workers, decision.gpu_memory_fraction, decision.per_gpu or 1)
        if (final.threads, final.gpu_memory_fraction, final.workers_on_gpu) != (
                first.spec.threads, first.spec.gpu_memory_fraction, first.spec.workers_on_gpu):
            self._respec_first = final

    async def _relaunch_with(self, worker: Worker, spec: WorkerSpec) -> None:
        """Replace a worker's process with one of a new spec, losing nothing: it stops being chosen,
        finishes what it holds, stops, and the new one loads."""
        worker.ready = False
        deadline = time.monotonic() + self.settings.request_timeout_s
        while worker.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        worker.stopping = True
        if worker.channel is not None and worker.channel.transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                worker.channel.send(stop_message())
                worker.channel.transport.close()
        if worker.process is not None:
            await asyncio.get_running_loop().run_in_executor(None, worker.process.join, 5)
            if worker.process.is_alive():
                worker.process.kill()
        worker.spec = WorkerSpec(**{**spec.as_dict(), "ring_name": worker.ring.name if worker.ring else None})
        worker.stopping = False
        if not self._stopping:
            log.info("worker %d restarts with %d thread(s) to match the other workers", worker.slot, spec.threads)
            await self._launch(worker)

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _launch(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        child_conn = Connection(child_sock.detach())
        process = self.context.Process(target=worker_entry, args=(worker.spec.as_dict(), child_conn),
                                       name=f"forkless-worker-{worker.slot}", daemon=True)
        await loop.run_in_executor(None, process.start)
        child_conn.close()  # only the child holds its end now: its death reads as EOF here
        worker.process = process
        worker.pid = process.pid
        worker.ready = False
        worker.stopping = False
        channel = _Channel(lambda frame: self._on_frame(worker, frame), lambda: self._on_lost(worker, channel))
        await loop.create_unix_connection(lambda: channel, sock=parent_sock)
        worker.channel = channel

    # --- scheduling: the one place batches are formed and sent --------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request (QueueFull when the queue is full) and start what can start now."""
        self.batcher.submit(request)
        self.pump()

    def pump(self) -> None:
        """While a worker can start a batch, give it the batch the batcher cuts for it now."""
        while True:
            index = dispatch.choose(self.workers)
            if index is None:
                return
            batch = self.batcher.next_batch(time.perf_counter(), self.busy())
            if batch is None:
                return
            if isinstance(batch, float):  # waiting for the batch to fill, at most until its deadline
                self._wake_in(batch)
                return
            self._send(self.workers[index], batch)

    def _wake_in(self, delay: float) -> None:
        """Pump again in ``delay`` s, or earlier: a timer already due by then stays (while a batch fills,
        every request would otherwise cancel and re-arm one; an early pump just says how long is left)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        # uvloop answers call_later of a delay it rounds to nothing with a plain Handle (no when()): the due
        # time is kept here.
        self._timer = loop.call_later(delay, self._on_timer)
        self._timer_due = due

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def busy(self) -> bool:
        return any(worker.inflight for worker in self.workers)

    def _send(self, worker: Worker, requests: list[Request]) -> None:
        assert worker.channel is not None
        self._next_batch += 1
        batch_id = self._next_batch
        if worker.ring is not None and not worker.inflight:
            worker.ring.reset()
        packing = time.perf_counter()
        try:
            descriptions, payload, allocations = pack_tensors(concatenate(requests), worker.ring)
        except Exception as exc:  # inputs that cannot be joined: fail these requests, keep serving
            for request in requests:
                self._finish(request, exception=ModelError(f"cannot batch the inputs: {exc}"))
            return
        size = sum(r.size for r in requests)
        batch = _Batch(batch_id, requests, allocations, size)
        batch.input_s = batch.sent - packing
        worker.inflight[batch_id] = batch
        worker.samples_in_flight += size
        worker.last_used = batch.sent
        now = batch.sent
        for request in requests:
            self.metrics.queue_seconds.observe(now - request.enqueued)
        self.metrics.batch_size.observe(size)
        deadlines = [r.deadline for r in requests]
        deadline = None if None in deadlines else max(deadlines)  # type: ignore[type-var]
        worker.channel.send(infer_message(batch_id, descriptions, payload, deadline, requests[0].parameters))

    # --- frames from workers -----------------------------------------------------------------
    def _on_frame(self, worker: Worker, frame: bytes) -> None:
        header, inline = decode_frame(frame)
        kind = header["t"]
        if kind in (OK, ERR):
            batch = worker.inflight.pop(header["id"], None)
            if worker.ring is not None and batch is not None:
                for offset in batch.allocations:
                    worker.ring.release(offset)
            if header.get("gpu_mem") is not None:
                worker.gpu_memory = header["gpu_mem"]
            if header.get("busy_s") is not None:
                worker.record_batch_time(header["busy_s"])
            if batch is not None:
                worker.samples_in_flight -= batch.size
                round_trip = time.perf_counter() - batch.sent
                self.metrics.inference_seconds.observe(round_trip)
                busy = header.get("busy_s") or 0.0
                self.metrics.batch_finished(len(batch.requests), batch.size, batch.input_s, busy, max(0.0, round_trip - busy))
                if kind == OK:
                    worker.crashes = 0
                    self._resolve(batch, unpack_tensors(header["outputs"], inline, None))
                else:
                    for request in batch.requests:
                        self._finish(request, exception=ModelError(header["error"]))
            self.pump()
        elif kind == READY:
            worker.ready = True
            worker.load_failures = 0
            worker.last_error = None
            worker.gpu_memory = header.get("gpu_mem")
            worker.peak_memory = header.get("peak_mem")
            if self.metadata is None:
                self.metadata = header["meta"]
            log.info("worker %d ready (pid %s)", worker.slot, header.get("pid"))
            if self.auto_pending:
                self._grow(worker, header)
            elif self._respec_first is not None and worker.slot != 0:
                spec, self._respec_first = self._respec_first, None
                self._spawn_task(self._relaunch_with(self.workers[0], spec))
            self.pump()
        elif kind == LOAD_ERROR:
            worker.last_error = header["error"]
            worker.load_failures += 1

    def _resolve(self, batch: _Batch, outputs: list[NamedTensor]) -> None:
        requests = batch.requests
        if len(requests) == 1:
            self._finish(requests[0], result=outputs)
            return
        for tensor in outputs:
            if tensor.array.ndim == 0 or tensor.array.shape[0] != batch.size:
                error = ModelError(
                    f"output {tensor.name!r} has first dimension {tensor.array.shape[:1]} for a batch of "
                    f"{batch.size}: a batched model must return one row per input row"
                )
                for request in requests:
                    self._finish(request, exception=error)
                return
        offset = 0
        for request in requests:
            end = offset + request.size
            self._finish(request, result=[NamedTensor(t.name, t.array[offset:end]) for t in outputs])
            offset = end

    @staticmethod
    def _finish(request: Request, result: Any = None, exception: Exception | None = None) -> None:
        if request.timer is not None:
            request.timer.cancel()
        if request.future.done():
            return
        if exception is not None:
            request.future.set_exception(exception)
        else:
            request.future.set_result(result)

    # --- death, restart, back-off -------------------------------------------------------------
    def _on_lost(self, worker: Worker, channel: _Channel) -> None:
        if worker.channel is not channel:
            return
        worker.channel = None
        was_ready = worker.ready
        worker.ready = False
        orphans: list[Request] = []
        for batch in worker.inflight.values():
            for request in batch.requests:
                if request.future.done():
                    continue
                if request.retried:
                    self._finish(request, exception=WorkerDied(
                        f"worker {worker.slot} died while running this request, twice; not retrying again"))
                else:
                    request.retried = True
                    orphans.append(request)
        worker.inflight.clear()
        worker.samples_in_flight = 0
        if worker.ring is not None:
            worker.ring.reset()
        if self._stopping or worker.stopping:
            return
        if orphans:
            self.metrics.retried_requests += len(orphans)
            self.batcher.requeue(orphans)
            self.pump()
        if not was_ready and worker.last_error is None:  # died before it could even report
            worker.load_failures += 1
            if worker.process is not None and worker.process.exitcode is None:
                # Its socket closes a moment before the kernel lets it be reaped; only load failures wait here.
                worker.process.join(0.5)
            worker.last_error = died_while_loading(worker.process.exitcode if worker.process else None)
        if was_ready:
            worker.crashes += 1
            log.error("worker %d (pid %s) died%s; restarting", worker.slot, worker.pid,
                      f", {len(orphans)} request(s) retried" if orphans else "")
        else:
            log.error("worker %d failed to load the model (attempt %d of %d): %s", worker.slot,
                      worker.load_failures, self.settings.max_load_attempts, worker.last_error)
            if worker.load_failures >= self.settings.max_load_attempts and not self.ready_count():
                self.on_fatal(f"the model cannot be loaded: {worker.last_error}")
                return
        self._spawn_task(self._restart(worker))

    async def _restart(self, worker: Worker) -> None:
        attempts = max(worker.crashes, worker.load_failures)
        delay = min(MAX_BACKOFF_S, 0.25 * 2 ** max(0, attempts - 1))
        process = worker.process
        if process is not None:
            await asyncio.get_running_loop().run_in_executor(None, process.join, 5)
            if process.is_alive():
                process.kill()
        await asyncio.sleep(delay)
        if self._stopping:
            return
        self.metrics.worker_restarts += 1
        await self._launch(worker)

    # --- state and shutdown -----------------------------------------------------------------------
    def ready_count(self) -> int:
        return sum(1 for worker in self.workers if worker.ready)

    def inflight_count(self) -> int:
        return sum(len(batch.requests) for worker in self.workers for batch in worker.inflight.values())

    def gpu_memory(self) -> dict[int, int]:
        return {w.slot: w.gpu_memory for w in self.workers if w.gpu_memory is not None}

    def peak_memory(self) -> dict[int, int]:
        return {w.slot: w.peak_memory for w in self.workers if w.peak_memory is not None}

    async def stop(self) -> None:
        """Stop every worker: ask politely, then kill; leave no process and no shared memory behind."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._restarts):
            task.cancel()
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            worker.stopping = True
            if worker.channel is not None and worker.channel.transport is not None:
                try:
                    worker.channel.send(stop_message())
                    worker.channel.transport.close()
                except (OSError, RuntimeError):
                    pass
        for worker in self.workers:
            process = worker.process
            if process is not None:
                await loop.run_in_executor(None, process.join, 5)
                if process.is_alive():
                    log.warning("worker %d did not stop; killing it", worker.slot)
                    process.kill()
                    await loop.run_in_executor(None, process.join, 5)
            if worker.ring is not None:
                worker.ring.close()
