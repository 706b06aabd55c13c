"""The spawned side: set the environment, then import torch, then load the model, then serve batches.

Nothing model-shaped crosses the process boundary: the worker gets plain settings and builds
the model itself. The order matters: CUDA_VISIBLE_DEVICES and the thread budget must be in the
environment before torch (and its OpenMP runtime) is first imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from typing import Any

from ..channel import (
    STOP,
    WorkerSpec,
    decode_frame,
    err_message,
    load_error_message,
    map_ring,
    ok_message,
    ready_message,
    unpack_tensors,
)
from ..logs import configure_logging

log = logging.getLogger("forkless.worker")


def apply_environment(spec: WorkerSpec) -> None:
    """Pin the GPU and the thread budget; must run before torch is imported."""
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu
    elif spec.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    threads = str(spec.threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = threads
    os.environ["FORKLESS_WORKER_ID"] = str(spec.worker_id)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker if its parent dies, so no worker outlives the server."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def prepare_torch(spec: WorkerSpec) -> None:
    if spec.format not in ("torchscript", "torch-export", "python", "kserve"):
        return
    try:
        import torch
    except ImportError:
        if spec.format in ("python", "kserve"):
            return
        raise
    torch.set_num_threads(spec.threads)
    if spec.device == "cuda" and spec.gpu_memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(spec.gpu_memory_fraction, 0)


def gpu_memory_bytes(spec: WorkerSpec) -> int | None:
    if spec.device != "cuda" or "torch" not in sys.modules:
        return None
    import torch

    return int(torch.cuda.memory_reserved(0))


def device_memory_bytes(spec: WorkerSpec) -> int | None:
    """The total memory of this worker's GPU (None on CPU)."""
    if spec.device != "cuda" or "torch" not in sys.modules:
        return None
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def short_error(exc: BaseException, limit: int = 500) -> str:
    """The gist of a model error for the client: TorchScript wraps the cause in a long traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    gist = lines[-1] if lines else ""
    if not gist.startswith(type(exc).__name__):
        gist = f"{type(exc).__name__}: {gist}"
    return gist[:limit]


def run(spec_dict: dict[str, Any], conn: Connection) -> None:
    """Worker process entry point (the target multiprocessing spawns)."""
    spec = WorkerSpec(**spec_dict)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    apply_environment(spec)
    configure_logging(spec.log_format, spec.log_level, worker_id=spec.worker_id)
    # TorchScript is what users bring; torch's deprecation notice is said once in our docs instead.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")

    try:
        started = time.perf_counter()
        prepare_torch(spec)
        from .loaders import load_model
        from .warmup import resident_bytes, warm_up

        model = load_model(spec.format, spec.model_path, spec.handler, spec.device, spec.threads, spec.precision,
                           spec.signature, spec.model_name)
        ring = map_ring(spec.ring_name, spec.ring_size) if spec.ring_name else None
        log.info("loaded %s (%s, %s) on %s%s with %d thread(s) in %.2fs", spec.model_path or spec.handler,
                 spec.format, spec.precision, spec.device, f" (GPU {spec.gpu})" if spec.gpu is not None else "",
                 spec.threads, time.perf_counter() - started)
        for note in model.notes:
            log.info("%s", note)
        measured = warm_up(model, spec.input_shapes, spec.max_batch_size, spec.device, spec.gpu_memory_fraction,
                           spec.workers_on_gpu)
        if isinstance(measured, str):
            log.warning("no warm-up: %s", measured)
            model.warm_up = {"skipped": measured}
        else:
            log.info("warm-up: a batch of %d in %.3fs, peak memory %.1f MiB (%.1f MiB of activations) on %s",
                     measured.batch, measured.seconds, measured.peak_bytes / 2**20,
                     measured.activation_bytes / 2**20, measured.device)
            model.warm_up = measured.as_dict()
    except BaseException as exc:  # report every load failure to the front-end, then exit non-zero
        message = f"{type(exc).__name__}: {exc}"
        log.error("model failed to load: %s", message)
        with contextlib.suppress(OSError):
            conn.send_bytes(load_error_message(message))
        sys.exit(1)

    peak = model.warm_up.get("peak_bytes")
    conn.send_bytes(ready_message(model.metadata(), os.getpid(), gpu_memory_bytes(spec), peak,
                                  device_memory_bytes(spec), resident_bytes()))
    serve(conn, model.predict, ring, spec)


def serve(conn: Connection, predict: Any, ring: memoryview | None, spec: WorkerSpec) -> None:
    while True:
        try:
            frame = bytearray(conn.recv_bytes())  # writable: a model may work on its inputs in place
        except (EOFError, OSError):
            return  # the front-end is gone or closed the channel: stop
        header, inline = decode_frame(frame)
        if header.get("t") == STOP:
            return
        batch_id = header["id"]
        deadline = header.get("deadline")
        if deadline is not None and time.time() > deadline:
            reply = err_message(batch_id, "the request timed out before it ran")
            try:
                conn.send_bytes(reply)
            except OSError:
                return
            continue
        started = time.perf_counter()
        try:
            outputs = predict(unpack_tensors(header["inputs"], inline, ring), header.get("params"))
            reply = ok_message(batch_id, outputs, time.perf_counter() - started, gpu_memory_bytes(spec))
        except Exception as exc:  # the model raised: answer 500 with the message, keep serving
            log.warning("batch %s failed: %s", batch_id, "".join(traceback.format_exception_only(exc)).strip())
            reply = err_message(batch_id, short_error(exc), time.perf_counter() - started)
        try:
            conn.send_bytes(reply)
        except OSError:
            return
