"""One settings object per process: CLI flags = FORKLESS_* environment = what the operator renders.

The table `FLAGS` is the single source of truth and the contract between the operator and the
runtime: the argument parser, the environment lookup, the documentation, the operator's
rendering (it imports this module: standard library only, shipped in both images) and the
CRD's descriptions, defaults and bounds are all derived from it, and tests/operator/
test_contract.py fails on any disagreement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "FORKLESS_"

FORK_REFUSAL = (
    "start method 'fork' is refused: a forked worker cannot re-initialize CUDA "
    "(RuntimeError: Cannot re-initialize CUDA in forked subprocess) and on CPU it deadlocks in the "
    "OpenMP thread pool the parent already started; use 'spawn' (default) or 'forkserver'"
)

# "kserve": an unmodified kserve.Model subclass (--handler), answering with KServe's own payload types.
MODEL_FORMATS = ("torchscript", "torch-export", "onnx", "python", "kserve")
# Formats whose model is user code named by --handler (the model URI, if any, is its directory).
HANDLER_FORMATS = ("python", "kserve")
EXTENSION_FORMATS = {".pt": "torchscript", ".ts": "torchscript", ".pt2": "torch-export", ".onnx": "onnx"}
START_METHODS = ("spawn", "forkserver")
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# package.module:ClassName, ASCII identifiers; the CRD validates handler strings with this pattern too.
# The Open Inference Protocol's tensor datatypes (protocol/tensors.py maps them to numpy; here for the CRD).
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES")
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


@dataclass(frozen=True)
class Settings:
    """Everything the front-end and the workers need, as plain data that crosses process boundaries."""

    model_name: str = ""
    model_uri: str = ""
    models: tuple[str, ...] = ()  # more models, "name=URI" or "name=pkg.module:Class" each (models.py)
    model_repository: str | None = None  # a Triton-layout directory: every subdirectory is a model
    signature: str | None = None  # a JSON or config.pbtxt file, or inline JSON: the model's tensors
    format: str | None = None
    handler: str | None = None
    workers: int | str | None = None  # a count, or "auto" (pool/auto.py)
    start_method: str = "spawn"
    device: str = "auto"
    threads_per_worker: int | None = None
    gpu_memory_fraction: float | None = None
    precision: str = "fp32"
    input_shapes: str | None = None
    max_batch_size: int = 32
    max_batch_delay_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 60.0
    grace_period_s: float = 30.0
    drain_delay_s: float = 0.0
    max_body_mb: float = 64.0
    max_load_attempts: int = 3
    shm_threshold_kb: float = 16.0
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int = 8081
    log_format: str = "text"
    log_level: str = "info"
    access_log: bool = False

    @property
    def model_path(self) -> str:
        """The local file the URI names (`file://` or a plain path)."""
        uri = self.model_uri
        return uri[len("file://"):] if uri.startswith("file://") else uri

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        if self.handler:
            return "python"
        ext = os.path.splitext(self.model_path)[1].lower()
        if ext in EXTENSION_FORMATS:
            return EXTENSION_FORMATS[ext]
        raise ValueError(
            f"cannot infer the model format from {self.model_uri!r}: give --format "
            f"({', '.join(MODEL_FORMATS)}) or use one of the extensions {', '.join(EXTENSION_FORMATS)}"
        )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 1 or auto, got {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _start_method(text: str) -> str:
    if text == "fork":
        raise argparse.ArgumentTypeError(FORK_REFUSAL)
    if text not in START_METHODS:
        raise argparse.ArgumentTypeError(f"must be 'spawn' or 'forkserver', got {text!r}")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


def _handler(text: str) -> str:
    if not re.fullmatch(HANDLER_PATTERN, text):
        raise argparse.ArgumentTypeError(f"must look like 'package.module:ClassName', got {text!r}")
    return text


def parse_input_shapes(text: str) -> list[list[int]]:
    """``3x64x64,10`` -> [[3, 64, 64], [10]]: per-sample shapes, one per input, the batch left out."""
    shapes: list[list[int]] = []
    for part in text.split(","):
        try:
            dims = [int(d) for d in part.strip().lower().split("x")]
        except ValueError:
            dims = []
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"input shape {part.strip()!r} must be positive sizes joined by x, e.g. 3x64x64")
        shapes.append(dims)
    return shapes


def format_input_shapes(shapes: list[list[int]]) -> str:
    return ",".join("x".join(str(d) for d in dims) for dims in shapes)


def _input_shapes(text: str) -> str:
    try:
        return format_input_shapes(parse_input_shapes(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_entry(text: str) -> str:
    name, sep, uri = text.partition("=")
    if not sep or not re.fullmatch(MODEL_NAME_PATTERN, name) or not uri:
        raise argparse.ArgumentTypeError(f"must be NAME=URI (a name of letters, digits, '.', '_', '-'), got {text!r}")
    return text


def _signature(text: str) -> str:
    if not text.lstrip().startswith("{") and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"must be a JSON or config.pbtxt file, or inline JSON; no file {text!r}")
    return text


def _port_or_off(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, or 0 for off; got {value}")
    return value


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


@dataclass(frozen=True)
class Flag:
    field: str
    parse: Callable[[str], Any]
    help: str
    required: bool = False
    choices: tuple[str, ...] = ()  # the only values accepted, for flags that take a name
    repeated: str | None = None  # the singular flag given once per value (--model); its env joins them with ","


def _choices(field: str, choices: tuple[str, ...], help: str) -> Flag:
    return Flag(field, _choice(*choices), help, choices=choices)


FLAGS: tuple[Flag, ...] = (
    Flag("model_name", str, "name the model is served under (needed unless --model or --model-repository "
         "names every model)"),
    Flag("model_uri", str, "model file: a path or file:// URI", required=False),
    Flag("models", _model_entry,
         "serve another model beside (or instead of) --model-name: NAME=URI, or NAME=package.module:Class for "
         "a Python handler; give it once per model; each gets its own workers, batcher and share of the memory",
         repeated="model"),
    Flag("model_repository", str,
         "a model repository directory (Triton's layout): each subdirectory is a model named after it, its "
         "model file in it or in a version directory, its config.pbtxt giving the signature (and the handler of "
         "a python backend model)"),
    Flag("signature", _signature,
         "the model's inputs and outputs (names, datatypes, shapes with -1 for a variable dimension): a JSON "
         "file or text as in V2 model metadata, or a Triton config.pbtxt; TorchScript and Python handlers "
         "declare none otherwise, and requests are checked against it"),
    _choices("format", MODEL_FORMATS, "model format (inferred from the extension when not given)"),
    Flag("handler", _handler, "module:Class with load() and predict(inputs), imported only in the workers"),
    Flag("workers", _workers,
         "model worker processes (default: one per visible GPU, else 1), or auto: the most that fit, from the "
         "first worker's measured memory and the device's (or the container's) memory"),
    Flag("start_method", _start_method, "how workers start: spawn (default) or forkserver; fork is refused",
         choices=START_METHODS),
    _choices("device", DEVICES, "auto picks cuda when a GPU is visible"),
    Flag("threads_per_worker", _positive_int, "torch/OpenMP/MKL threads per worker (default: usable CPUs / workers)"),
    Flag("gpu_memory_fraction", _fraction, "cap each worker's share of its GPU's memory, 0 < F <= 1"),
    _choices("precision", PRECISIONS,
             "serve in fp32, fp16 (GPU only), bf16 (GPU, or a CPU with avx512_bf16/AMX) or int8 (dynamic "
             "quantization on CPU, TorchScript and ONNX); clients keep their own datatypes"),
    Flag("input_shapes", _input_shapes,
         "each input's shape for one sample, e.g. 3x64x64, or 3x64x64,10 for two inputs: TorchScript "
         "records none, and the warm-up and `plan` need them (other formats declare their own)"),
    Flag("max_batch_size", _positive_int, "largest batch the dynamic batcher forms (1 turns batching off)"),
    Flag("max_batch_delay_ms", _non_negative_float, "longest a request waits for a batch to fill while workers are busy"),
    Flag("max_queue", _positive_int, "queued requests beyond which new ones get 503 + Retry-After"),
    Flag("request_timeout_s", _non_negative_float, "a request not answered by then gets 504"),
    Flag("grace_period_s", _non_negative_float, "on SIGTERM, how long in-flight requests may finish"),
    Flag("drain_delay_s", _non_negative_float,
         "on SIGTERM, keep serving this long first, unready and closing each connection after its answer, "
         "so that load balancers (Kubernetes endpoints) stop sending work here before new requests are refused"),
    Flag("max_body_mb", _non_negative_float, "largest request body accepted (413 beyond)"),
    Flag("max_load_attempts", _positive_int, "consecutive failed model loads before the server exits non-zero"),
    Flag("shm_threshold_kb", _non_negative_float,
         "input tensors this big or bigger travel to workers through shared memory (0 turns it off)"),
    Flag("host", str, "address to listen on"),
    Flag("port", int, "port to listen on"),
    Flag("grpc_port", _port_or_off, "Open Inference Protocol gRPC port (0 turns gRPC off)"),
    _choices("log_format", LOG_FORMATS, "text or json logs"),
    _choices("log_level", LOG_LEVELS, "log level"),
    Flag("access_log", _bool, "log every request (off by default: it costs throughput)"),
)


FLAGS_BY_FIELD: dict[str, Flag] = {flag.field: flag for flag in FLAGS}
# The settings a Ray Serve replica reads (engine ray: forkless_runtime.engines.ray); the front-end's own
# (ports, queue, drain, workers) are Serve's business there. The operator renders exactly these.
RAY_REPLICA_SETTINGS = ("model_name", "model_uri", "format", "handler", "signature", "device", "threads_per_worker",
                        "gpu_memory_fraction", "precision", "input_shapes", "max_batch_size", "max_batch_delay_ms",
                        "max_body_mb", "max_load_attempts", "log_level")
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings) if f.name in FLAGS_BY_FIELD}


def flag_name(field: str) -> str:
    flag = FLAGS_BY_FIELD.get(field)
    return "--" + ((flag.repeated if flag and flag.repeated else None) or field).replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def env_value(value: Any) -> str:
    """The FORKLESS_* text of a setting's value, as every parser above reads it back unchanged:
    5.0 -> "5", 0.45 -> "0.45", True -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple | list):
        return ",".join(value)
    return str(value)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag; each defaults to its FORKLESS_* variable, then to the Settings default."""
    for flag in FLAGS:
        env = env_name(flag.field)
        default = DEFAULTS.get(flag.field)
        help_text = f"{flag.help} [env {env}]"
        parser.add_argument(
            flag_name(flag.field),
            dest=flag.field,
            type=flag.parse,
            default=None,
            action="append" if flag.repeated else "store",
            help=help_text + (f" (default {default})" if default not in (None, "", (), dataclasses.MISSING) else ""),
        )


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Flags win over the environment, the environment over defaults; bad values exit with usage."""
    values: dict[str, Any] = {}
    for flag in FLAGS:
        value = getattr(args, flag.field, None)
        if value is None and env_name(flag.field) in os.environ:
            raw = os.environ[env_name(flag.field)]
            try:
                value = ([flag.parse(part) for part in raw.split(",") if part] if flag.repeated
                         else flag.parse(raw))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"{env_name(flag.field)}={raw!r}: {exc}")
        if flag.repeated and value is not None:
            value = tuple(value)
        if value is not None:
            values[flag.field] = value
        elif flag.required:
            parser.error(f"{flag_name(flag.field)} (or {env_name(flag.field)}) is required")
    settings = Settings(**values)
    if not settings.model_name and not settings.models and not settings.model_repository:
        parser.error("--model-name (or FORKLESS_MODEL_NAME) is required unless --model or --model-repository "
                     "names the models")
    if settings.model_name and not settings.model_uri and not settings.handler:
        parser.error("--model-uri (or FORKLESS_MODEL_URI) is required unless --handler is given")
    if settings.format in HANDLER_FORMATS and not settings.handler:
        parser.error(f"--format {settings.format} needs --handler module:Class")
    try:
        if settings.model_name:
            settings = resolve_model_directory(settings)
            settings.resolved_format  # noqa: B018 - validates early, with the reason
    except ValueError as exc:
        from .termination import MODEL_LOAD_FAILED, report_termination

        report_termination(MODEL_LOAD_FAILED, str(exc))
        parser.error(str(exc))
    return settings


def resolve_model_directory(settings: Settings) -> Settings:
    """A model URI that names a directory (a downloaded prefix, a Triton repository) as the one model
    file inside it; a Python handler gets the directory itself, as KServe's custom models do."""
    if settings.handler or settings.format in HANDLER_FORMATS or not os.path.isdir(settings.model_path):
        return settings
    from .storage.resolve import resolve_model_file  # not needed by the operator, which imports this module

    return settings.replace(model_uri=resolve_model_file(settings.model_path))
