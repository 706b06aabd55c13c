"""How a request for a `--format kserve` model rides the ordinary path to a worker, untouched.

KServe's model classes take KServe's own payloads (a V1 dict, an `InferRequest`, a gRPC message),
so the front-end decodes nothing for them: the body travels as one BYTES element, the protocol,
verb and request headers as the batch's parameters (never shared: such models are not batched),
and the worker answers with the body, the status and the response headers the same way. The
queue limit, timeouts, metrics, recovery and drain stay those of every other model. Torch-free;
both the front-end and the worker import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .tensors import NamedTensor, ProtocolError

BODY = "kserve-body"
REPLY = "kserve-reply"
PARAMETER = "kserve"
PROTOCOLS = ("v1", "v2", "grpc")


@dataclass(frozen=True)
class Call:
    protocol: str  # v1, v2 or grpc
    verb: str  # predict or explain
    headers: dict[str, str]
    body: bytes


def headers_of(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers as Starlette's ``dict(request.headers)`` gives them to KServe: lower-case names,
    the last value of a repeated name."""
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in raw}


def encode_call(call: Call) -> tuple[list[NamedTensor], dict[str, Any]]:
    body = np.empty(1, dtype=object)
    body[0] = call.body
    return [NamedTensor(BODY, body)], {PARAMETER: {"protocol": call.protocol, "verb": call.verb,
                                                   "headers": call.headers}}


def decode_call(tensors: list[NamedTensor], parameters: dict[str, Any] | None) -> Call:
    meta = (parameters or {}).get(PARAMETER)
    if not tensors or tensors[0].name != BODY or not isinstance(meta, dict):
        raise ProtocolError("a kserve model takes the request as KServe sends it (the front-end passes it through)")
    return Call(str(meta["protocol"]), str(meta["verb"]), dict(meta["headers"]), bytes(tensors[0].array[0]))


def encode_reply(status: int, headers: dict[str, str], body: bytes) -> list[NamedTensor]:
    reply = np.empty(1, dtype=object)
    reply[0] = orjson.dumps({"status": status, "headers": headers})
    answer = np.empty(1, dtype=object)
    answer[0] = body
    return [NamedTensor(BODY, answer), NamedTensor(REPLY, reply)]


def decode_reply(outputs: list[NamedTensor]) -> tuple[int, dict[str, str], bytes]:
    by_name = {t.name: t for t in outputs}
    meta = orjson.loads(by_name[REPLY].array[0])
    return int(meta["status"]), dict(meta["headers"]), bytes(by_name[BODY].array[0])
