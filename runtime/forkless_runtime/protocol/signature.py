"""A model's signature: its input and output tensors (name, datatype, shape with -1 for a variable
dimension), as V2 model metadata reports them.

TorchScript records no datatypes or shapes, and a Python handler none unless it says so: the user
declares them in a JSON file (the `inputs`/`outputs` of V2 model metadata) or in a Triton
`config.pbtxt`, so that requests are checked before they reach the model. Only the subset of
Triton's text format that model configurations use is read here (messages, lists, scalars, comments).
Pure functions and no dependency beyond the standard library and orjson.
"""

from __future__ import annotations

import os
import re
from typing import Any

import orjson

from .tensors import DATATYPE_TO_DTYPE, ProtocolError

# Triton's data_type names -> the protocol's datatypes.
TRITON_TYPES = {f"TYPE_{name}": name for name in DATATYPE_TO_DTYPE if name != "BYTES"} | {"TYPE_STRING": "BYTES"}
# Triton platforms -> forkless model formats.
TRITON_PLATFORMS = {"pytorch_libtorch": "torchscript", "onnxruntime_onnx": "onnx", "torch_export": "torch-export"}
CONFIG_FILE = "config.pbtxt"

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\]:,;]|[^\s{}\[\]:,;"#]+')


class SignatureError(ValueError):
    """A signature file that cannot be read: the model does not start, and this says why."""


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise SignatureError(f"config.pbtxt: cannot read {text[position:position + 20]!r}")
        token = match.group()
        position = match.end()
        if not token.isspace() and not token.startswith("#"):
            tokens.append(token)
    return tokens


def _scalar(token: str) -> Any:
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return {"true": True, "false": False}.get(token, token)  # enum names (TYPE_FP32) stay words


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text format -> dict; a field given more than once becomes a list."""
    tokens = _tokens(text)
    position = 0

    def value() -> Any:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                if tokens[position] == ",":
                    position += 1
            position += 1
            return items
        return _scalar(token)

    def message(end: str | None) -> dict[str, Any]:
        nonlocal position
        fields: dict[str, Any] = {}
        while position < len(tokens) and tokens[position] != end:
            key = tokens[position]
            position += 1
            if position < len(tokens) and tokens[position] == ":":
                position += 1
            item = value()
            if key in fields:
                existing = fields[key]
                fields[key] = [*(existing if isinstance(existing, list) else [existing]),
                               *(item if isinstance(item, list) else [item])]
            else:
                fields[key] = item
            if position < len(tokens) and tokens[position] in ",;":
                position += 1
        if end is not None:
            position += 1
        return fields

    try:
        return message(None)
    except IndexError:
        raise SignatureError("config.pbtxt ends inside a message or list") from None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def from_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A parsed config.pbtxt -> {inputs, outputs}: with max_batch_size > 0 the batch dimension, which
    Triton leaves out of dims, comes first as -1."""
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    signature: dict[str, Any] = {}
    for kind in ("input", "output"):
        tensors = []
        for entry in _as_list(config.get(kind)):
            data_type = entry.get("data_type", "")
            if data_type not in TRITON_TYPES:
                raise SignatureError(f"config.pbtxt: {kind} {entry.get('name')!r} has data_type {data_type!r}; "
                                     f"expected one of {', '.join(TRITON_TYPES)}")
            dims = [int(d) for d in _as_list(entry.get("dims"))]
            tensors.append({"name": entry.get("name", ""), "datatype": TRITON_TYPES[data_type],
                            "shape": [-1, *dims] if batched else dims})
        signature[f"{kind}s"] = tensors
    return validate(signature, "config.pbtxt")


def validate(signature: Any, source: str) -> dict[str, Any]:
    """Every tensor named, with a known datatype and a shape of sizes or -1; names unique."""
    if not isinstance(signature, dict):
        raise SignatureError(f"{source}: a signature is an object with 'inputs' and 'outputs'")
    clean: dict[str, Any] = {}
    for kind in ("inputs", "outputs"):
        tensors = signature.get(kind, [])
        if not isinstance(tensors, list):
            raise SignatureError(f"{source}: '{kind}' must be a list of tensors")
        seen: set[str] = set()
        clean[kind] = []
        for tensor in tensors:
            name = tensor.get("name") if isinstance(tensor, dict) else None
            if not isinstance(name, str) or not name or name in seen:
                raise SignatureError(f"{source}: every one of the {kind} needs a unique 'name', got {tensor!r}")
            seen.add(name)
            datatype = tensor.get("datatype")
            if datatype not in DATATYPE_TO_DTYPE:
                raise SignatureError(f"{source}: {name!r} has datatype {datatype!r}; expected one of "
                                     f"{', '.join(DATATYPE_TO_DTYPE)}")
            shape = tensor.get("shape", [-1])
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
                raise SignatureError(f"{source}: {name!r} has shape {shape!r}; expected sizes, -1 where any size goes")
            clean[kind].append({"name": name, "datatype": datatype, "shape": shape})
    if not clean["inputs"]:
        raise SignatureError(f"{source}: the signature declares no inputs")
    return clean


def read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            return parse_pbtxt(file.read())
    except OSError as exc:
        raise SignatureError(f"cannot read {path}: {exc.strerror}") from None


def load(text_or_path: str) -> dict[str, Any]:
    """--signature: inline JSON, a JSON file, or a config.pbtxt."""
    if text_or_path.lstrip().startswith("{"):
        source, text = "--signature", text_or_path
    elif text_or_path.endswith(".pbtxt"):
        return from_model_config(read_config(text_or_path))
    else:
        source = text_or_path
        try:
            with open(text_or_path, encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise SignatureError(f"cannot read {text_or_path}: {exc.strerror}") from None
    try:
        return validate(orjson.loads(text), source)
    except orjson.JSONDecodeError as exc:
        raise SignatureError(f"{source}: not JSON: {exc}") from None


def config_beside(model_file: str, root: str) -> str | None:
    """The config.pbtxt of a repository layout that declares inputs: beside the model file, or one level
    up (the model's directory, above its version directory), not above ``root``. A config without
    inputs (Triton fills them in from ONNX and others) leaves the model's own signature."""
    directory = os.path.dirname(os.path.abspath(model_file))
    root = os.path.abspath(root)
    for _ in range(2):
        candidate = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(candidate):
            return candidate if "input" in read_config(candidate) else None
        if directory == root or not directory.startswith(root):
            break
        directory = os.path.dirname(directory)
    return None


def check_request(inputs: list[tuple[str, str, tuple[int, ...]]], declared: list[dict[str, Any]]) -> list[int] | None:
    """Check (name, datatype, shape) of each input against the declared inputs; a ProtocolError names the
    tensor, what was sent and what is expected. Returns the declared position of each input when they are
    matched by name, None when a single input is matched by position (a KServe client's `input-0`)."""
    by_name = {spec["name"]: position for position, spec in enumerate(declared)}
    sent = [name for name, _, _ in inputs]
    if len(declared) == 1 and len(inputs) == 1 and sent[0] not in by_name:
        order = None  # one input under any name: what KServe's clients send
        pairs = [(inputs[0], declared[0])]
    else:
        unknown = [name for name in sent if name not in by_name]
        if unknown:
            raise ProtocolError(f"unknown input {unknown[0]!r}; the model takes {', '.join(by_name)}")
        missing = [spec["name"] for spec in declared if spec["name"] not in sent]
        if missing:
            raise ProtocolError(f"missing input {missing[0]!r}; the model takes {', '.join(by_name)}")
        if len(set(sent)) != len(sent):
            raise ProtocolError("an input is sent twice; each input once")
        order = [by_name[name] for name in sent]
        pairs = [(tensor, declared[by_name[tensor[0]]]) for tensor in inputs]
    for (name, datatype, shape), spec in pairs:
        if spec["datatype"] and datatype != spec["datatype"]:
            raise ProtocolError(f"input {name!r}: the model expects {spec['datatype']}, got {datatype}")
        want = spec["shape"]
        if want == [-1]:
            continue  # any shape
        if len(shape) != len(want) or any(d != -1 and d != s for d, s in zip(want, shape, strict=True)):
            raise ProtocolError(f"input {name!r}: the model expects shape {want}, got {list(shape)} "
                                "(-1: any size)")
    return order
