"""The wire between the front-end and a worker, the one module both sides import: what a worker
is spawned with, the messages each side sends, their framing, and tensors in shared memory.

A frame is `[u32 header length][JSON header][inline payload]`, carried in
multiprocessing.Connection's length-prefixed framing (`FRAME_SIZE`, a `!i` size first), so the
blocking worker side can use `Connection.recv_bytes`/`send_bytes` and the asyncio side reads the
same bytes. Every message is built by one function below and named by one constant.

Large input tensors are written once into a shared-memory ring that the front-end owns (one per
worker) and the worker maps; the worker answers batches in order, so the ring frees in FIFO order.
Only torch-free code lives here, and nothing of the front-end, the batcher or the pool.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import struct
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import orjson

from .protocol.tensors import NamedTensor, pack_bytes, unpack_bytes

FRAME_SIZE = struct.Struct("!i")  # multiprocessing.Connection's frame prefix
_U32 = struct.Struct("<I")
SHM_MIN_BYTES = 16 * 1024  # smaller tensors ride inline: a memcpy into the frame is cheaper than bookkeeping
SHM_DIR = "/dev/shm"

# The module the spawned process runs; the front-end names it and never imports it.
WORKER_MODULE = "forkless_runtime.worker.main"


@dataclass(frozen=True)
class WorkerSpec:
    """Plain data a worker needs; pickled by multiprocessing when it spawns the worker."""

    worker_id: int
    format: str
    model_path: str
    handler: str | None
    device: str  # "cpu" or "cuda"
    gpu: str | None  # the one GPU id this worker sees as cuda:0
    threads: int
    gpu_memory_fraction: float | None
    ring_name: str | None
    ring_size: int
    log_format: str = "text"
    log_level: str = "info"
    precision: str = "fp32"
    input_shapes: str | None = None  # per-sample shapes, "3x64x64,10"; for the warm-up of formats that declare none
    max_batch_size: int = 1
    workers_on_gpu: int = 1  # workers sharing this worker's GPU: each gets an equal share unless capped
    signature: str | None = None  # --signature: a file or inline JSON, read in the worker
    model_name: str = "model"  # the name it is served under (a KServe model is constructed with it)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_entry(spec: dict[str, Any], conn: Connection) -> None:
    """The target a worker process is spawned with: imports the worker's code in the child only."""
    importlib.import_module(WORKER_MODULE).run(spec, conn)


# --- messages: front-end -> worker -------------------------------------------------------------
INFER = "infer"  # a batch: {"id", "inputs", "deadline"?, "params"?} + tensors
STOP = "stop"  # finish and exit
# --- messages: worker -> front-end -------------------------------------------------------------
READY = "ready"  # the model loaded: {"meta", "pid", "gpu_mem"}
LOAD_ERROR = "load_error"  # the model cannot load: {"error"}; the worker exits
OK = "ok"  # a batch answered: {"id", "outputs", "busy_s", "gpu_mem"} + tensors
ERR = "err"  # a batch failed: {"id", "error", "busy_s"}


def infer_message(batch_id: int, inputs: list[dict[str, Any]], payload: list[bytes | memoryview],
                  deadline: float | None, parameters: dict[str, Any] | None = None) -> bytes:
    header: dict[str, Any] = {"t": INFER, "id": batch_id, "inputs": inputs}
    if deadline is not None:
        header["deadline"] = deadline  # wall-clock: the worker skips a batch nobody waits for any more
    if parameters:
        header["params"] = parameters  # the request's parameters: one set per batch (the batcher keeps them apart)
    return encode_frame(header, payload)


def stop_message() -> bytes:
    return encode_frame({"t": STOP})


def ready_message(meta: dict[str, Any], pid: int, gpu_mem: int | None, peak_mem: int | None = None,
                  device_mem: int | None = None, rss: int | None = None) -> bytes:
    """A loaded worker's hello: its metadata and its memory figures (--workers auto sizes from them)."""
    return encode_frame({"t": READY, "meta": meta, "pid": pid, "gpu_mem": gpu_mem, "peak_mem": peak_mem,
                         "device_mem": device_mem, "rss": rss})


def load_error_message(error: str) -> bytes:
    return encode_frame({"t": LOAD_ERROR, "error": error})


def ok_message(batch_id: int, outputs: list[NamedTensor], busy_s: float, gpu_mem: int | None) -> bytes:
    """``busy_s``: the seconds the worker spent on the batch, which tells the pool whether
    pipelining pays for this model."""
    descriptions, payload, _ = pack_tensors([(t.name, [t.array]) for t in outputs])
    header = {"t": OK, "id": batch_id, "outputs": descriptions, "busy_s": busy_s, "gpu_mem": gpu_mem}
    return encode_frame(header, payload)


def err_message(batch_id: int, error: str, busy_s: float = 0.0) -> bytes:
    return encode_frame({"t": ERR, "id": batch_id, "error": error, "busy_s": busy_s})


def encode_frame(header: dict[str, Any], payload: list[bytes | memoryview] | None = None) -> bytes:
    head = orjson.dumps(header)
    return b"".join([_U32.pack(len(head)), head, *(payload or ())])


def decode_frame(frame: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(frame)
    (length,) = _U32.unpack_from(view, 0)
    return orjson.loads(view[4 : 4 + length]), view[4 + length :]


def pack_tensors(
    groups: list[tuple[str, list[np.ndarray]]], ring: ShmRing | None = None
) -> tuple[list[dict[str, Any]], list[bytes | memoryview], list[int]]:
    """Describe tensors for a frame; each group's arrays are joined along dimension 0.

    Big numeric tensors are concatenated straight into the shared ring (the only copy the
    front-end makes); the rest ride inline. Returns (descriptions, inline payload parts,
    ring allocations to release when the batch is answered).
    """
    descriptions: list[dict[str, Any]] = []
    payload: list[bytes | memoryview] = []
    allocations: list[int] = []
    inline_offset = 0
    for name, parts in groups:
        first = parts[0]
        shape = list(first.shape)
        if len(parts) > 1:
            shape[0] = sum(p.shape[0] for p in parts)
        entry: dict[str, Any] = {"name": name, "dtype": first.dtype.str, "shape": shape}
        if first.dtype == object:
            blob: bytes | memoryview = pack_bytes(np.concatenate(parts) if len(parts) > 1 else first)
            entry["bytes"] = True
        else:
            nbytes = first.dtype.itemsize * _count(shape)
            offset = ring.allocate(nbytes) if ring is not None and nbytes >= ring.min_bytes else None
            if offset is not None:
                assert ring is not None
                target = np.ndarray(shape, dtype=first.dtype, buffer=ring.buffer, offset=offset)
                if len(parts) > 1:
                    np.concatenate(parts, axis=0, out=target)
                else:
                    target[...] = first
                entry["shm"] = [offset, nbytes]
                allocations.append(offset)
                descriptions.append(entry)
                continue
            joined = np.concatenate(parts, axis=0) if len(parts) > 1 else np.ascontiguousarray(first)
            blob = joined.data.cast("B") if joined.size else b""
        entry["inline"] = [inline_offset, len(blob)]
        inline_offset += len(blob)
        payload.append(blob)
        descriptions.append(entry)
    return descriptions, payload, allocations


def _count(shape: list[int] | tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def unpack_tensors(descriptions: list[dict[str, Any]], inline: memoryview, shm: memoryview | None) -> list[NamedTensor]:
    """Rebuild tensors from a frame without copying: arrays view the frame or the shared ring."""
    tensors: list[NamedTensor] = []
    for entry in descriptions:
        shape = tuple(entry["shape"])
        if "shm" in entry:
            if shm is None:
                raise RuntimeError("a tensor arrived in shared memory but this worker has no ring mapped")
            offset, size = entry["shm"]
            source = shm[offset : offset + size]
        else:
            offset, size = entry["inline"]
            source = inline[offset : offset + size]
        if entry.get("bytes"):
            array = unpack_bytes(source, _count(shape), shape)
        else:
            array = np.frombuffer(source, dtype=np.dtype(entry["dtype"])).reshape(shape)
        tensors.append(NamedTensor(entry["name"], array))
    return tensors


@dataclass
class _Block:
    offset: int
    size: int


class ShmRing:
    """A FIFO allocator over one shared-memory segment, owned and unlinked by the front-end."""

    def __init__(self, size: int, name: str | None = None, min_bytes: int = SHM_MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        self.name = self._shm.name
        self.size = size
        self.buffer: memoryview | None = self._shm.buf
        self._blocks: deque[_Block] = deque()
        self._head = 0  # next free byte

    def allocate(self, size: int) -> int | None:
        """An offset with `size` free bytes, or None when the ring is full (the caller sends inline)."""
        size = (size + 63) & ~63
        if size > self.size:
            return None
        if not self._blocks:
            self._head = 0
            return self._push(0, size)
        tail = self._blocks[0].offset
        if self._head >= tail:
            if self._head + size <= self.size:
                return self._push(self._head, size)
            if size <= tail:  # wrap around
                return self._push(0, size)
            return None
        if self._head + size <= tail:
            return self._push(self._head, size)
        return None

    def _push(self, offset: int, size: int) -> int:
        self._blocks.append(_Block(offset, size))
        self._head = offset + size
        return offset

    def release(self, offset: int) -> None:
        """Free the oldest block; blocks are answered in order, so `offset` must be the oldest."""
        if self._blocks and self._blocks[0].offset == offset:
            self._blocks.popleft()
        else:  # out of order should not happen; drop the block wherever it is rather than leak
            for block in list(self._blocks):
                if block.offset == offset:
                    self._blocks.remove(block)
                    break

    def reset(self) -> None:
        self._blocks.clear()
        self._head = 0

    def close(self) -> None:
        self.buffer = None
        with contextlib.suppress(BufferError):
            self._shm.close()
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()


def map_ring(name: str, size: int) -> memoryview:
    """Map the front-end's ring in a worker without registering it with a resource tracker.

    `SharedMemory(name)` in a spawned child would register the segment with the shared resource
    tracker and unlink it when the child exits; a plain mmap of /dev/shm does not.
    """
    fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return memoryview(mapping)
