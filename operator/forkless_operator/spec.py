"""The InferenceService API (serving.forkless.dev/v1alpha1) as pydantic models.

These models are the single source of truth: ``forkless_operator.crd`` turns them
into the structural CRD schema, and the operator parses every object it watches
through them. Each CEL rule (``x-kubernetes-validations``) is declared next to the
field it guards, together with the pydantic validator that enforces the same rule
with the same message, so an object the API server rejects is rejected here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from forkless_runtime.settings import (
    DATATYPES,
    DEFAULTS,
    FLAGS,
    HANDLER_PATTERN,
    env_name,
    env_value,
    flag_name,
)
from forkless_runtime.storage import uris
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

GROUP = "serving.forkless.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ("fisvc",)
CATEGORIES = ("forkless",)

# A Quantity as the API server accepts it (k8s.io/apimachinery resource.Quantity).
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# Names the operator gives to children (Deployment, Service, label values) must be DNS-1035 labels.
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# The operator's own defaults where they differ from the runtime's: a pod must keep serving for a
# moment after SIGTERM while its endpoints are removed (the runtime alone stops at once).
OPERATOR_DRAIN_DELAY_S = 5.0

# Floating-point slack for "fractions add up to at most 1" (0.1 * 10 must pass).
FRACTION_EPSILON = 1e-9


@dataclass(frozen=True)
class Rule:
    """One CEL rule of the CRD and the Python check that mirrors it.

    ``rule`` and ``message`` go into ``x-kubernetes-validations`` verbatim;
    ``holds`` evaluates the same rule on the parsed pydantic value, so the model
    and the API server reject the same objects with the same message.
    """

    rule: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None

    def cel(self) -> JsonDict:
        entry: JsonDict = {"rule": self.rule, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry

    def check(self, value: Any) -> None:
        if not self.holds(value):
            raise ValueError(self.message)


def validations(*rules: Rule) -> JsonDict:
    """The schema extra that declares ``rules`` on a field or a model."""
    return {"x-kubernetes-validations": [rule.cel() for rule in rules]}


def runtime_default(field: str, default: Any = None) -> str:
    """How a spec field's description names its default: the runtime's own (from its settings
    table, so the CRD cannot drift from it), or ``default`` where the operator sets another."""
    value = DEFAULTS[field] if default is None else default
    return f"Default {env_value(value)} (forkless-runtime {flag_name(field)})."


def effective_workers(workers: int | str | None, gpus: int) -> int | str:
    """Workers per replica: as given (a count or "auto"), else one per GPU, else one."""
    return workers if workers is not None else max(gpus, 1)


def workers_per_gpu(workers: int, gpus: int) -> int:
    """Workers pinned round-robin to ``gpus`` devices: the busiest GPU holds ceil(workers / gpus)."""
    return math.ceil(workers / gpus)


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors.

    The API server prunes unknown fields and kubectl's strict field validation
    reports them; forbidding them here keeps typos in examples and tests visible.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# --- spec.model -------------------------------------------------------------------------------

def _scheme_cel(prefixes: tuple[str, ...]) -> str:
    return " || ".join(f"self.startsWith('{prefix}')" for prefix in prefixes)


URI_PREFIXES = tuple(f"{scheme}://" for scheme in uris.SCHEMES)
URI_SCHEME_RULE = Rule(
    rule=_scheme_cel(URI_PREFIXES),
    message=uris.SCHEME_MESSAGE,
    holds=lambda uri: uri.startswith(URI_PREFIXES),
)


def _uri_form_rule(prefix: str, pattern: str, message: str) -> Rule:
    """A URI of this scheme must match the runtime's pattern (forkless_runtime.storage.uris)."""
    assert "\\" not in pattern and "'" not in pattern, "CEL string literals take the pattern verbatim"
    return Rule(
        rule=f"!self.startsWith('{prefix}') || self.matches('{pattern}')",
        message=message,
        holds=lambda uri: not uri.startswith(prefix) or _matches(pattern, uri),
    )


URI_FORM_RULES = tuple(_uri_form_rule(*rule) for rule in uris.RULES)
PYTHON_HANDLER_RULE = Rule(
    rule="!has(self.format) || !(self.format in ['python', 'kserve']) || has(self.handler)",
    message="handler is required for formats python and kserve: give the module:Class the workers import",
    holds=lambda m: m.format not in ("python", "kserve") or m.handler is not None,
)


def _matches(pattern: str, value: str) -> bool:
    import re

    return re.search(pattern, value) is not None


CACHE_NEEDS_DOWNLOAD_RULE = Rule(
    rule="!has(self.cache) || " + _scheme_cel(tuple(f"{scheme}://" for scheme in uris.DOWNLOADED_SCHEMES))
    .replace("self.startsWith", "self.uri.startsWith"),
    message="cache applies to downloaded models only: s3://, gs://, hf://, https:// or http://",
    holds=lambda m: m.cache is None or parse_uri_scheme(m.uri) in uris.DOWNLOADED_SCHEMES,
)


def parse_uri_scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


REPOSITORY_RULE = Rule(
    rule="!has(self.repository) || !self.repository || (!has(self.name) && !has(self.format) && "
         "!has(self.handler) && !has(self.signature) && !has(self.inputShapes))",
    message="a model repository names its models in its directories: leave name, format, handler, signature "
            "and inputShapes out (each model's config.pbtxt gives them)",
    holds=lambda m: not m.repository or (m.name is None and m.format is None and m.handler is None
                                         and m.signature is None and m.input_shapes is None),
)


class ModelCacheSpec(_Model):
    """Where downloads are kept between pods."""

    claim_name: str = Field(
        ...,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "A PersistentVolumeClaim in the InferenceService's namespace (ReadWriteMany when pods run on "
            "several nodes). Downloads are kept there under the URI and the version of what it names "
            "(ETags, or the Hugging Face commit): a second pod, a restart or a scale-up downloads nothing, "
            "and a new version of the model is downloaded beside the old one."
        ),
    )


class TensorSignature(_Model):
    """One tensor of a model's signature, as V2 model metadata reports it."""

    name: str = Field(..., min_length=1, max_length=256, description="The tensor's name, as clients send it.")
    datatype: Literal[DATATYPES] = Field(  # type: ignore[valid-type]
        ..., description="Open Inference Protocol datatype, e.g. FP32, INT64, BYTES.")
    shape: list[Annotated[int, Field(ge=-1, le=1_000_000_000)]] = Field(
        ..., max_length=16, description="Sizes, the batch dimension first; -1 where any size goes.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )


class ModelSignature(_Model):
    """The model's inputs and outputs: requests are checked against them before they are queued."""

    inputs: list[TensorSignature] = Field(
        ..., min_length=1, max_length=64, description="The model's inputs, in order.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    outputs: list[TensorSignature] = Field(
        default_factory=list, max_length=64, description="The model's outputs; their names label the answers.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class ModelSpec(_Model):
    """Which model to serve and how to load it."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Served model name, as in /v2/models/{name}. Defaults to metadata.name.",
    )
    uri: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description=(
            "Where the model lives. Downloaded by an init container (forkless-runtime fetch) into an "
            "emptyDir: s3://<bucket>[/<key or prefix>] (AWS or any S3-compatible endpoint), "
            "gs://<bucket>[/<object or prefix>], hf://<owner>/<repository>[:<revision>], or one file over "
            "https:// or http://; credentials as KServe keeps them (Secrets listed by serviceAccountName, or "
            "the serving.kserve.io/storageSecretName annotation). Mounted: pvc://<claim>/<path> (read-only). "
            "Or file:///<path> in the image or a user volume. A prefix or directory resolves to the one "
            "model file in it, or to the highest version of a Triton-style <name>/<version>/model.<ext> tree."
        ),
        json_schema_extra=validations(URI_SCHEME_RULE, *URI_FORM_RULES),
    )
    download_timeout_seconds: int = Field(
        default=1800,
        ge=1,
        le=86400,
        description=(
            "How long the download of an s3://, gs://, hf:// or http(s):// model may take in all before "
            "the pod reports ModelDownloadFailed instead of hanging. Default 1800."
        ),
    )
    cache: ModelCacheSpec | None = Field(
        default=None,
        description="Keep downloads on a PersistentVolumeClaim so that pods with the same model version do not download again.",
    )
    format: Literal["torchscript", "torch-export", "onnx", "python", "kserve"] | None = Field(
        default=None,
        description=(
            "Model format; inferred by the runtime from the file extension when omitted. python: a handler "
            "class with load() and predict(inputs); kserve: an unmodified kserve.Model subclass (the kserve "
            "package in an image built on the runtime's), answering with KServe's own payloads and headers."
        ),
    )
    handler: str | None = Field(
        default=None,
        max_length=256,
        pattern=HANDLER_PATTERN,
        description="Import string module:Class of the handler the workers load; required for formats python and kserve.",
    )
    input_shapes: list[Annotated[list[Annotated[int, Field(ge=1, le=1_000_000)]], Field(
        min_length=1, max_length=8, json_schema_extra={"x-kubernetes-list-type": "atomic"})]] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Each input's shape for one sample, the batch dimension left out, e.g. [[3, 224, 224]]. "
            "TorchScript files record no shapes: with them each worker runs one warm-up batch at the largest "
            "batch size and measures its memory before it reports ready (torch.export and ONNX models "
            "declare their own). forkless-runtime --input-shapes."
        ),
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    signature: ModelSignature | None = Field(
        default=None,
        description=(
            "The model's inputs and outputs (names, datatypes, shapes). TorchScript files and Python handlers "
            "record none: with it, a request of the wrong shape, datatype or names gets a 400 naming the tensor "
            "instead of a model error, and metadata reports them. forkless-runtime --signature."
        ),
    )
    repository: bool = Field(
        default=False,
        description=(
            "The uri is a model repository in Triton's layout: every subdirectory is a model named after it "
            "(its file in it or in a version directory, its signature and a python backend's handler in its "
            "config.pbtxt), and every pod serves them all. name, format, handler, inputShapes and signature "
            "then come from each model's directory. forkless-runtime --model-repository."
        ),
    )

    model_config = ConfigDict(json_schema_extra=validations(PYTHON_HANDLER_RULE, CACHE_NEEDS_DOWNLOAD_RULE,
                                                            REPOSITORY_RULE))

    @field_validator("uri")
    @classmethod
    def _uri_rules(cls, uri: str) -> str:
        for rule in (URI_SCHEME_RULE, *URI_FORM_RULES):
            rule.check(uri)
        return uri

    @model_validator(mode="after")
    def _handler_rule(self) -> ModelSpec:
        PYTHON_HANDLER_RULE.check(self)
        CACHE_NEEDS_DOWNLOAD_RULE.check(self)
        REPOSITORY_RULE.check(self)
        return self


# --- spec.runtime -----------------------------------------------------------------------------

NO_FORK_RULE = Rule(
    rule="self != 'fork'",
    message=(
        "startMethod fork is not supported: CUDA cannot be re-initialized in a forked child, "
        "and OpenMP thread pools deadlock after fork; use spawn or forkserver"
    ),
    holds=lambda method: method != "fork",
)
START_METHOD_RULE = Rule(
    rule="self in ['spawn', 'forkserver']",
    message="startMethod must be spawn or forkserver",
    holds=lambda method: method in ("spawn", "forkserver"),
)
WORKERS_RULE = Rule(
    rule="type(self) == string || self >= 1",
    message="workers must be at least 1: each worker is one spawned process that loads the model",
    holds=lambda workers: isinstance(workers, str) or workers >= 1,
)
MAX_WORKERS = 256
WORKERS_MAX_RULE = Rule(
    rule=f"type(self) == string || self <= {MAX_WORKERS}",
    message=f"workers must be at most {MAX_WORKERS}",
    holds=lambda workers: isinstance(workers, str) or workers <= MAX_WORKERS,
)
WORKERS_AUTO_RULE = Rule(
    rule="type(self) == int || self == 'auto'",
    message="workers must be a number or auto (the most that fit, from the first worker's measured memory)",
    holds=lambda workers: isinstance(workers, int) or workers == "auto",
)
WORKERS_RULES = (WORKERS_RULE, WORKERS_MAX_RULE, WORKERS_AUTO_RULE)
# The runtime's own settings: every one is rendered from a spec field or by the operator, so env
# cannot set them (other FORKLESS_* names, e.g. a handler's own, are the user's).
RUNTIME_ENV_NAMES = tuple(env_name(flag.field) for flag in FLAGS)
RESERVED_ENV_RULE = Rule(
    rule="self.all(e, !(e.name in [" + ", ".join(f"'{name}'" for name in RUNTIME_ENV_NAMES) + "]))",
    message=(
        "env cannot set the runtime's settings (FORKLESS_<FLAG>; `forkless-runtime flags` lists them): "
        "the operator renders them from the spec; set the matching spec.runtime or spec.model field instead"
    ),
    holds=lambda env: all(e.name not in RUNTIME_ENV_NAMES for e in env),
)


class Batching(_Model):
    """The runtime's deadline batcher."""

    max_batch_size: int | None = Field(
        default=None, ge=1, le=4096,
        description="Largest batch, in samples, a worker receives; 1 turns batching off. " + runtime_default("max_batch_size"),
    )
    max_delay_ms: float | None = Field(
        default=None,
        ge=0,
        le=60_000,
        description=(
            "How long a request may wait for others to fill a batch while every worker is busy, in "
            "milliseconds. " + runtime_default("max_batch_delay_ms")
        ),
    )


class EnvVar(_Model):
    """A container environment variable (core/v1 EnvVar); valueFrom is passed through unchanged."""

    name: str = Field(..., min_length=1, max_length=256, description="Name of the variable.")
    value: str | None = Field(default=None, max_length=32_768, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="Source of the value (core/v1 EnvVarSource): secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class RuntimeSpec(_Model):
    """How the forkless runtime serves the model inside each replica."""

    image: str | None = Field(
        default=None, max_length=512, description="Runtime container image. Defaults to the operator's configured image."
    )
    workers: int | str | None = Field(
        default=None,
        description=(
            "Worker processes per replica, each loading the model once. Defaults to one per GPU, else 1. "
            "auto: the first worker measures its memory in its warm-up at the largest batch, then as many "
            "start as fit in 90% of the GPU's memory (on CPU, the container's memory limit), at most one per "
            "usable CPU, each capped at its share of the GPU."
        ),
        json_schema_extra={"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                           **validations(*WORKERS_RULES)},
    )
    start_method: str = Field(
        default="spawn",
        max_length=16,
        description=(
            "How workers are started: spawn or forkserver. fork is rejected: CUDA cannot be "
            "re-initialized in a forked child, and OpenMP thread pools deadlock after fork."
        ),
        json_schema_extra=validations(NO_FORK_RULE, START_METHOD_RULE),
    )
    threads_per_worker: int | None = Field(
        default=None, ge=1, le=256,
        description=(
            "Intra-op CPU threads per worker (torch, OpenMP, MKL). Defaults to the usable CPUs of the "
            "container (cgroup quota and affinity) divided by the workers (forkless-runtime --threads-per-worker)."
        ),
    )
    gpu_memory_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Share of one GPU's memory each worker may allocate (0 < f <= 1), enforced in the worker. "
            "Workers sharing a GPU must fit: gpuMemoryFraction * ceil(workers / gpus) <= 1."
        ),
    )
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        default=None,
        description=(
            "Numeric precision the workers serve in; clients keep sending and receiving their own datatypes. "
            "fp16 and bf16 cast the model and its inputs (fp16 on GPUs only; bf16 on GPUs and on CPUs with "
            "bf16 instructions, refused elsewhere); int8 is dynamic quantization on CPU for TorchScript and "
            "ONNX models, verified to have changed the model. " + runtime_default("precision")
        ),
    )
    batching: Batching | None = Field(
        default=None, description="Dynamic batching of requests; off (a batch size of 1) when omitted."
    )
    max_queue: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Requests that may wait; beyond it the runtime answers 503 at once. " + runtime_default("max_queue"),
    )
    request_timeout_seconds: float | None = Field(
        default=None, gt=0, le=3600,
        description="Deadline of one request, in seconds; late requests fail with 504. " + runtime_default("request_timeout_s"),
    )
    drain_delay_seconds: float | None = Field(
        default=None, ge=0, le=300,
        description=(
            "After SIGTERM, how long a pod keeps answering, unready, while its endpoints are removed, "
            "before it refuses new requests. " + runtime_default("drain_delay_s", OPERATOR_DRAIN_DELAY_S)
        ),
    )
    grace_period_seconds: float | None = Field(
        default=None, ge=0, le=3600,
        description=(
            "After the drain delay, how long queued and in-flight requests may finish; the pod's "
            "terminationGracePeriodSeconds covers both. " + runtime_default("grace_period_s")
        ),
    )
    max_body_megabytes: float | None = Field(
        default=None, gt=0, le=4096,
        description="Largest request body accepted, in MB; larger ones get 413. " + runtime_default("max_body_mb"),
    )
    max_load_attempts: int | None = Field(
        default=None, ge=1, le=100,
        description=(
            "Consecutive failed model loads before the runtime exits non-zero (and the pod restarts). "
            + runtime_default("max_load_attempts")
        ),
    )
    shared_memory_threshold_kilobytes: float | None = Field(
        default=None, ge=0, le=1_048_576,
        description=(
            "Input tensors this big or bigger travel to the workers through shared memory; 0 turns it off. "
            + runtime_default("shm_threshold_kb")
        ),
    )
    log_format: Literal["text", "json"] | None = Field(
        default=None, description="Log format of the runtime. Defaults to the operator's configuration (json)."
    )
    log_level: Literal["debug", "info", "warning", "error"] | None = Field(
        default=None, description="Log level of the runtime. " + runtime_default("log_level")
    )
    grpc: bool = Field(
        default=True,
        description=(
            "Serve the Open Inference Protocol over gRPC too, on container and Service port 8081 named grpc "
            "(appProtocol kubernetes.io/h2c), for tritonclient.grpc and KServe's gRPC clients. "
            "forkless-runtime --grpc-port (0 when false)."
        ),
    )
    access_log: bool | None = Field(
        default=None, description="Log every request (it costs throughput). " + runtime_default("access_log")
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Extra environment variables of the runtime container. The runtime's own settings "
            "(FORKLESS_<FLAG>) are set through the fields above, not here."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            **validations(RESERVED_ENV_RULE),
        },
    )

    @field_validator("workers")
    @classmethod
    def _workers_rule(cls, workers: int | str | None) -> int | str | None:
        if workers is not None:
            for rule in WORKERS_RULES:
                rule.check(workers)
        return workers

    @field_validator("start_method")
    @classmethod
    def _start_method_rules(cls, method: str) -> str:
        NO_FORK_RULE.check(method)
        START_METHOD_RULE.check(method)
        return method

    @field_validator("env")
    @classmethod
    def _env_rules(cls, env: list[EnvVar]) -> list[EnvVar]:
        RESERVED_ENV_RULE.check(env)
        names = [e.name for e in env]
        if len(names) != len(set(names)):
            raise ValueError("env names must be unique")
        return env


# --- spec.resources, spec.autoscaling, spec.scheduling ----------------------------------------

QUANTITY_SCHEMA: JsonDict = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": QUANTITY_PATTERN,
}


def checked_quantity(value: Any) -> Any:
    """A Quantity as the API server's pattern accepts it, else a ValueError saying what one looks like."""
    if isinstance(value, str) and not _matches(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a quantity, e.g. 4, 500m or 16Gi")
    return value


class ResourcesSpec(_Model):
    """Compute resources of each replica."""

    gpus: int = Field(
        default=0, ge=0, le=16, description="GPUs per replica: the requests and limits of gpuResourceName."
    )
    gpu_resource_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Extended resource that counts GPUs, e.g. nvidia.com/mig-1g.10gb. Defaults to the operator's configuration (nvidia.com/gpu).",
    )
    cpu: str | int | None = Field(
        default=None,
        description="CPU request of the runtime container (a Quantity, e.g. 4 or 500m).",
        json_schema_extra=QUANTITY_SCHEMA,
    )
    memory: str | int | None = Field(
        default=None,
        description="Memory request and limit of the runtime container (a Quantity, e.g. 16Gi).",
        json_schema_extra=QUANTITY_SCHEMA,
    )
    shared_memory: str | int | None = Field(
        default=None,
        description=(
            "Size limit of the memory-backed /dev/shm that moves tensors between the front-end and "
            "the workers. Defaults to 1Gi per worker, at most the memory request."
        ),
        json_schema_extra=QUANTITY_SCHEMA,
    )

    @field_validator("cpu", "memory", "shared_memory")
    @classmethod
    def _quantity(cls, value: str | int | None) -> str | int | None:
        return checked_quantity(value)


MIN_MAX_REPLICAS_RULE = Rule(
    rule="self.minReplicas <= self.maxReplicas",
    message="minReplicas must be less than or equal to maxReplicas",
    holds=lambda a: a.min_replicas <= a.max_replicas,
)


# What each load metric reads from the runtime's /metrics (summed over its models), per replica.
LOAD_METRICS = {"queueDepth": "forkless_queue_depth", "inFlight": "forkless_requests_in_flight"}
KEDA_NEEDS_LOAD_METRIC_RULE = Rule(
    rule="!has(self.class) || self.class != 'keda' || !has(self.metric) || self.metric != 'cpu'",
    message=("class keda scales on a load metric (queueDepth or inFlight): CPU utilization needs no scaler, "
             "use class hpa"),
    holds=lambda a: a.class_ != "keda" or a.metric != "cpu",
)
CPU_TARGET_IS_CPU_RULE = Rule(
    rule="!has(self.targetCPUUtilization) || !has(self.metric) || self.metric == 'cpu'",
    message="targetCPUUtilization applies to metric cpu only: give target for queueDepth or inFlight",
    holds=lambda a: a.target_cpu_utilization is None or a.metric == "cpu",
)
CPU_TARGET_PERCENT_RULE = Rule(
    rule="!has(self.metric) || self.metric != 'cpu' || !has(self.target) || (self.target >= 1.0 && self.target <= 100.0)",
    message="a cpu target is a utilization in percent of the CPU request: between 1 and 100",
    holds=lambda a: a.metric != "cpu" or a.target is None or 1 <= a.target <= 100,
)


class AutoscalingSpec(_Model):
    """Who scales the runtime Deployment, on what: an HPA on CPU, KEDA (or an HPA) on the load the
    pods report, or someone else through the /scale subresource."""

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas the autoscaler keeps.")
    max_replicas: int = Field(..., ge=1, le=1000, description="Most replicas the autoscaler creates.")
    metric: Literal["cpu", "queueDepth", "inFlight"] = Field(
        default="cpu",
        description=(
            "What is scaled on. cpu: CPU utilization of the CPU request (a GPU server's CPU idles while its GPU "
            "saturates); queueDepth: requests waiting in the replicas' batchers; inFlight: requests queued or "
            "running in the replicas. The target is per replica."
        ),
    )
    target: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description=(
            "The metric's target per replica: utilization percent for cpu (default 80), requests for "
            "queueDepth (default 4) and inFlight (default 8). Replicas = ceil(total / target)."
        ),
    )
    target_cpu_utilization: int | None = Field(
        default=None,
        ge=1,
        le=100,
        alias="targetCPUUtilization",
        description="Older spelling of target for metric cpu, in percent of the CPU request.",
    )
    class_: Literal["hpa", "keda", "external"] = Field(
        default="hpa",
        alias="class",
        description=(
            "hpa: a HorizontalPodAutoscaler (load metrics need a custom metrics adapter serving the pods' "
            "forkless_* metrics); keda: a KEDA ScaledObject whose trigger is the operator itself (KEDA's external "
            "scaler protocol, reading each ready pod's /metrics; no Prometheus, no query to write), or a "
            "Prometheus trigger when the operator is given a Prometheus address; external: nothing is rendered and "
            "replicas are left alone, for an autoscaler of your own on the /scale subresource."
        ),
    )
    scale_up_seconds: int | None = Field(
        default=None, ge=0, le=3600,
        description="How long a higher recommendation must hold before scaling up (stabilization window). Default 0.",
    )
    scale_down_seconds: int | None = Field(
        default=None, ge=0, le=3600,
        description="How long a lower recommendation must hold before scaling down (stabilization window). Default 300.",
    )

    model_config = ConfigDict(json_schema_extra=validations(
        MIN_MAX_REPLICAS_RULE, KEDA_NEEDS_LOAD_METRIC_RULE, CPU_TARGET_IS_CPU_RULE, CPU_TARGET_PERCENT_RULE))

    @model_validator(mode="after")
    def _rules(self) -> AutoscalingSpec:
        for rule in (MIN_MAX_REPLICAS_RULE, KEDA_NEEDS_LOAD_METRIC_RULE, CPU_TARGET_IS_CPU_RULE,
                     CPU_TARGET_PERCENT_RULE):
            rule.check(self)
        return self

    @property
    def effective_target(self) -> float:
        """The target per replica after defaulting."""
        if self.target is not None:
            return self.target
        if self.metric == "cpu":
            return float(self.target_cpu_utilization or 80)
        return 4.0 if self.metric == "queueDepth" else 8.0


OPAQUE_LIST: JsonDict = {"x-kubernetes-list-type": "atomic", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}


class SchedulingSpec(_Model):
    """Where replicas may run; passed to the pod spec as given."""

    node_selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels a node must carry (pod spec nodeSelector).",
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=64,
        description="Extra tolerations (core/v1 Toleration), added to the GPU toleration and the operator's defaults.",
        json_schema_extra=OPAQUE_LIST,
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity and anti-affinity (core/v1 Affinity).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )
    topology_spread_constraints: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=32,
        description="How replicas spread across zones or nodes (core/v1 TopologySpreadConstraint).",
        json_schema_extra=OPAQUE_LIST,
    )


# --- spec.podTemplate ---------------------------------------------------------------------------

# The operator's names inside the pod (forkless_operator.render): the pod template may not take them.
RUNTIME_CONTAINER_NAME = "runtime"
INIT_CONTAINER_NAMES = ("download-model",)
OPERATOR_VOLUMES = ("dshm", "model", "model-cache", "user-gcp-sa")


class _OpenModel(_Model):
    """Declared fields are typed (and reachable by CEL); every other field of the Kubernetes type is
    kept as given (x-kubernetes-preserve-unknown-fields)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class ContainerResources(_OpenModel):
    """core/v1 ResourceRequirements."""

    limits: dict[str, str | int] | None = Field(default=None, max_length=16, description="Limits by resource name.",
                                                json_schema_extra={"additionalProperties": QUANTITY_SCHEMA})
    requests: dict[str, str | int] | None = Field(default=None, max_length=16, description="Requests by resource name.",
                                                  json_schema_extra={"additionalProperties": QUANTITY_SCHEMA})


class VolumeMount(_OpenModel):
    """core/v1 VolumeMount."""

    name: str = Field(..., max_length=253, description="The volume's name.")
    mount_path: str = Field(..., max_length=4096, description="Where the volume appears in the container.")


class ContainerTemplate(_OpenModel):
    """A core/v1 Container: named runtime, merged into the runtime container; else added."""

    name: str = Field(..., max_length=63, pattern=DNS1035_LABEL,
                      description="Container name; runtime names the operator's runtime container.")
    image: str | None = Field(default=None, max_length=512, description="Image of an added container.")
    command: list[str] | None = Field(default=None, max_length=64, description="Entrypoint of an added container.",
                                        json_schema_extra={"x-kubernetes-list-type": "atomic"})
    args: list[str] | None = Field(default=None, max_length=256, description="Arguments of an added container.",
                                        json_schema_extra={"x-kubernetes-list-type": "atomic"})
    working_dir: str | None = Field(default=None, max_length=4096, description="Working directory of an added container.")
    ports: list[dict[str, Any]] | None = Field(default=None, max_length=64, description="Ports of an added container.",
                                               json_schema_extra=OPAQUE_LIST)
    env: list[EnvVar] | None = Field(default=None, max_length=256, description="Environment variables.",
                                     json_schema_extra={"x-kubernetes-list-type": "atomic"})
    resources: ContainerResources | None = Field(default=None, description="Requests and limits, e.g. a CPU limit.")
    volume_mounts: list[VolumeMount] | None = Field(default=None, max_length=64, description="Volume mounts.",
                                                    json_schema_extra={"x-kubernetes-list-type": "atomic"})
    liveness_probe: dict[str, Any] | None = Field(default=None, description="Liveness probe of an added container.",
                                                  json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    readiness_probe: dict[str, Any] | None = Field(default=None, description="Readiness probe of an added container.",
                                                   json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    startup_probe: dict[str, Any] | None = Field(default=None, description="Startup probe of an added container.",
                                                 json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


def _runtime_entry(containers: list[ContainerTemplate] | None) -> ContainerTemplate | None:
    return next((c for c in containers or [] if c.name == RUNTIME_CONTAINER_NAME), None)


def _gpu_free(resources: ContainerResources | None) -> bool:
    keys = [*((resources.limits or {}) if resources else {}), *((resources.requests or {}) if resources else {})]
    return not any("gpu" in key or key.startswith("nvidia.com/") for key in keys)


_GPU_FREE_CEL = ("(!has({c}.resources) || ((!has({c}.resources.limits) || {c}.resources.limits.all(k, "
                 "!k.contains('gpu') && !k.startsWith('nvidia.com/'))) && (!has({c}.resources.requests) || "
                 "{c}.resources.requests.all(k, !k.contains('gpu') && !k.startsWith('nvidia.com/')))))")
RUNTIME_COMMAND_RULE = Rule(
    rule="self.all(c, c.name != 'runtime' || (!has(c.command) && !has(c.args) && !has(c.workingDir)))",
    message=("podTemplate cannot set the runtime container's command, args or workingDir: the operator starts "
             "forkless-runtime serve from the spec (set its settings in spec.runtime and spec.model)"),
    holds=lambda cs: all(c.name != "runtime" or (c.command is None and c.args is None and c.working_dir is None)
                         for c in cs),
)
RUNTIME_IMAGE_RULE = Rule(
    rule="self.all(c, c.name != 'runtime' || !has(c.image))",
    message="podTemplate cannot set the runtime container's image: use spec.runtime.image",
    holds=lambda cs: all(c.name != "runtime" or c.image is None for c in cs),
)
RUNTIME_PROBES_RULE = Rule(
    rule=("self.all(c, c.name != 'runtime' || (!has(c.ports) && !has(c.livenessProbe) && !has(c.readinessProbe) "
          "&& !has(c.startupProbe)))"),
    message=("podTemplate cannot set the runtime container's ports or probes: Ready means every worker loaded the "
             "model, which the operator's probes check on the ports it renders"),
    holds=lambda cs: all(c.name != "runtime" or (c.ports is None and c.liveness_probe is None
                                                 and c.readiness_probe is None and c.startup_probe is None)
                         for c in cs),
)
FORKLESS_ENV_RULE = Rule(
    rule="self.all(c, c.name != 'runtime' || !has(c.env) || c.env.all(e, !e.name.startsWith('FORKLESS_')))",
    message=("podTemplate cannot set FORKLESS_* variables in the runtime container: they are the operator's "
             "contract with the runtime; set the matching spec field (docs/operator.md lists each)"),
    holds=lambda cs: all(c.name != "runtime" or not any(e.name.startswith("FORKLESS_") for e in c.env or [])
                         for c in cs),
)
GPU_RESOURCE_RULE = Rule(
    rule="self.all(c, " + _GPU_FREE_CEL.format(c="c") + ")",
    message=("podTemplate cannot request GPUs: spec.resources.gpus (and gpuResourceName) counts them, and the "
             "workers are pinned one per GPU"),
    holds=lambda cs: all(_gpu_free(c.resources) for c in cs),
)
SHM_MOUNT_RULE = Rule(
    rule="self.all(c, c.name != 'runtime' || !has(c.volumeMounts) || c.volumeMounts.all(m, m.mountPath != '/dev/shm'))",
    message=("podTemplate cannot mount /dev/shm in the runtime container: it is the memory-backed volume sized by "
             "spec.resources.sharedMemory, through which the workers receive tensors"),
    holds=lambda cs: all(c.name != "runtime" or all(m.mount_path != "/dev/shm" for m in c.volume_mounts or [])
                         for c in cs),
)
INIT_CONTAINER_NAME_RULE = Rule(
    rule="self.all(c, !(c.name in " + str(list(INIT_CONTAINER_NAMES)) + "))",
    message="podTemplate cannot add an init container named download-model: the operator's downloads the model",
    holds=lambda cs: all(c.name not in INIT_CONTAINER_NAMES for c in cs),
)
VOLUME_NAME_RULE = Rule(
    rule="self.all(v, !(v.name in " + str(list(OPERATOR_VOLUMES)) + "))",
    message=("podTemplate cannot define the volumes dshm, model, model-cache or user-gcp-sa: the operator's "
             "(shared memory, the model, its cache, storage credentials)"),
    holds=lambda vs: all(v.name not in OPERATOR_VOLUMES for v in vs),
)
SELECTOR_LABEL_RULE = Rule(
    rule="self.all(k, !k.startsWith('app.kubernetes.io/'))",
    message=("podTemplate cannot set app.kubernetes.io/ labels: the operator's, and the Deployment's selector "
             "among them"),
    holds=lambda labels: not any(k.startswith("app.kubernetes.io/") for k in labels),
)


class NamedVolume(_OpenModel):
    """A core/v1 Volume."""

    name: str = Field(..., max_length=63, description="The volume's name.")


class PodTemplateMetadata(_Model):
    """Labels and annotations added to each pod."""

    labels: dict[str, str] | None = Field(
        default=None, max_length=64, description="Labels added to each pod.",
        json_schema_extra=validations(SELECTOR_LABEL_RULE))
    annotations: dict[str, str] | None = Field(default=None, max_length=64, description="Annotations added to each pod.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        SELECTOR_LABEL_RULE.check(value or {})
        return value


class PodTemplateSpec(_Model):
    """What a pod template may add to the rendered pod (a subset of core/v1 PodSpec)."""

    containers: list[ContainerTemplate] | None = Field(
        default=None, max_length=16,
        description=("Containers by name: `runtime` is merged into the runtime container (env, envFrom, resources "
                     "such as CPU and ephemeral-storage limits, volumeMounts, securityContext, lifecycle); any other "
                     "name is added as a sidecar."),
        json_schema_extra={**validations(RUNTIME_COMMAND_RULE, RUNTIME_IMAGE_RULE, RUNTIME_PROBES_RULE,
                                         FORKLESS_ENV_RULE, GPU_RESOURCE_RULE, SHM_MOUNT_RULE),
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    init_containers: list[ContainerTemplate] | None = Field(
        default=None, max_length=16, description="Init containers run after the operator's model download.",
        json_schema_extra={**validations(INIT_CONTAINER_NAME_RULE, GPU_RESOURCE_RULE),
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volumes: list[NamedVolume] | None = Field(
        default=None, max_length=64, description="Volumes added to the pod (core/v1 Volume).",
        json_schema_extra={**validations(VOLUME_NAME_RULE),
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    image_pull_secrets: list[dict[str, str]] | None = Field(
        default=None, max_length=16, description="Secrets to pull the runtime's (or a sidecar's) image.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"})
    runtime_class_name: str | None = Field(default=None, max_length=253, description="RuntimeClass of the pods.")
    security_context: dict[str, Any] | None = Field(
        default=None, description="Pod security context fields, set over the operator's hardened defaults.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    @model_validator(mode="after")
    def _rules(self) -> PodTemplateSpec:
        for rule in (RUNTIME_COMMAND_RULE, RUNTIME_IMAGE_RULE, RUNTIME_PROBES_RULE, FORKLESS_ENV_RULE,
                     GPU_RESOURCE_RULE, SHM_MOUNT_RULE):
            rule.check(self.containers or [])
        INIT_CONTAINER_NAME_RULE.check(self.init_containers or [])
        GPU_RESOURCE_RULE.check(self.init_containers or [])
        VOLUME_NAME_RULE.check(self.volumes or [])
        return self

    @property
    def runtime(self) -> ContainerTemplate | None:
        return _runtime_entry(self.containers)


class PodTemplate(_Model):
    """Pod metadata and spec merged onto the pods the operator renders (KServe inlines a PodSpec)."""

    metadata: PodTemplateMetadata | None = Field(default=None, description="Labels and annotations of the pods.")
    spec: PodTemplateSpec | None = Field(default=None, description="Pod spec fields merged onto the rendered pod.")


# --- engine: ray ---------------------------------------------------------------------------------

RAY_VERSION = "2.60.0"
# KubeRay names the RayCluster `<name>-<6 characters>` and checks this only in its controller.
RAY_NAME_MAX = 47
WHOLE_ABOVE_ONE_RULE = Rule(
    rule="!has(self.gpusPerReplica) || self.gpusPerReplica <= 1.0 || self.gpusPerReplica == double(int(self.gpusPerReplica))",
    message="ray.gpusPerReplica above 1 must be a whole number of GPUs: Ray shares a GPU only in fractions of one",
    holds=lambda r: r.gpus_per_replica is None or r.gpus_per_replica <= 1 or float(r.gpus_per_replica).is_integer(),
)
REPLICA_FITS_POD_RULE = Rule(
    rule="!has(self.gpusPerReplica) || self.gpusPerReplica <= double(self.gpusPerWorkerPod)",
    message="ray.gpusPerReplica must be at most ray.gpusPerWorkerPod: a replica runs inside one Ray worker pod",
    holds=lambda r: r.gpus_per_replica is None or r.gpus_per_replica <= r.gpus_per_worker_pod,
)


class RayHead(_Model):
    """The Ray head pod: GCS, dashboard, Serve's controller and HTTP proxy; it runs no model replica."""

    cpu: str | int = Field(default="1", description="CPU request of the head container.", json_schema_extra=QUANTITY_SCHEMA)
    memory: str | int = Field(
        default="4Gi", description="Memory request and limit of the head container (Ray's processes take about 2 GiB).",
        json_schema_extra=QUANTITY_SCHEMA)

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | int) -> str | int:
        return checked_quantity(value)


class RaySpec(_Model):
    """How the model is served by Ray Serve on a KubeRay RayService (engine ray). Every other field keeps
    its meaning: model, runtime batching and precision, runtime.workers (Serve replicas per replica of the
    service), resources (of each Ray worker pod group), scheduling, autoscaling (Serve's, on requests in flight)."""

    ray_version: str = Field(
        default=RAY_VERSION, pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$",
        description="Ray version of the image (it must hold ray[serve] of this version and forkless-runtime).")
    gpus_per_worker_pod: int = Field(
        default=1, ge=1, le=16,
        description="GPUs of each Ray worker pod (its GPU limit); the service's resources.gpus is split into pods of this many.")
    gpus_per_replica: float | None = Field(
        default=None, gt=0, le=16,
        description=("GPUs each Serve replica takes (Ray's ray_actor_options.num_gpus); fractions share a GPU, and "
                     "the replica caps its CUDA memory at that fraction itself (Ray does not). Default: "
                     "resources.gpus / runtime.workers."))
    max_ongoing_requests: int = Field(
        default=64, ge=1, le=100_000,
        description=("Requests a replica holds at once (Serve's max_ongoing_requests). Serve never batches beyond it; "
                     "Serve's default of 5 served 26 req/s where 64 served 383 on the same replicas."))
    upgrade_strategy: Literal["NewCluster", "None"] = Field(
        default="NewCluster",
        description=("NewCluster: a changed cluster is built beside the old one, then traffic switches (needs twice "
                     "the GPUs while upgrading); None: no second cluster, and changes to pods are not applied until "
                     "the service is recreated. Changes to the model's settings roll in place either way."))
    startup_timeout_seconds: int = Field(
        default=900, ge=60, le=86_400,
        description="How long the cluster may take to serve before KubeRay gives up (RayInitializingTimeout; it then deletes the cluster).")
    head: RayHead = Field(default_factory=lambda: RayHead.model_validate({}),
                          description="Resources of the head pod.", json_schema_extra={"default": {}})
    ingress: Literal["proxy", "haproxy"] = Field(
        default="proxy",
        description=("proxy: Serve's Python HTTP proxy; haproxy: Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY, "
                     "about 13x the throughput on small models, HTTP only)."))

    model_config = ConfigDict(json_schema_extra=validations(WHOLE_ABOVE_ONE_RULE, REPLICA_FITS_POD_RULE))

    @model_validator(mode="after")
    def _rules(self) -> RaySpec:
        for rule in (WHOLE_ABOVE_ONE_RULE, REPLICA_FITS_POD_RULE):
            rule.check(self)
        return self


def _ray(spec: Any) -> RaySpec:
    return spec.ray or RaySpec.model_validate({})


RAY_NAME_RULE = Rule(
    rule=(f"!has(self.spec.engine) || self.spec.engine != 'ray' || size(self.metadata.name) <= {RAY_NAME_MAX}"),
    message=(f"an engine ray InferenceService's name must be at most {RAY_NAME_MAX} characters: KubeRay adds a "
             "6-character suffix to its RayCluster's name"),
    holds=lambda isvc: isvc.spec.engine != "ray" or len(isvc.metadata.name) <= RAY_NAME_MAX,
)
ROOT_RULES = (RAY_NAME_RULE,)
ENGINE_IMMUTABLE_RULE = Rule(
    rule="self.engine == oldSelf.engine",
    message="engine cannot change: delete the InferenceService and create it with the other engine",
    holds=lambda s: True,  # a transition rule: only the API server sees the old object
)
RAY_ONLY_WITH_RAY_ENGINE_RULE = Rule(
    rule="!has(self.ray) || self.engine == 'ray'",
    message="ray applies to engine ray only: set engine: ray, or remove ray",
    holds=lambda s: s.ray is None or s.engine == "ray",
)
RAY_GPUS_SPLIT_RULE = Rule(
    rule="self.engine != 'ray' || !has(self.ray) || self.resources.gpus % self.ray.gpusPerWorkerPod == 0",
    message="with engine ray, resources.gpus must be a multiple of ray.gpusPerWorkerPod: the GPUs are split into Ray worker pods",
    holds=lambda s: s.engine != "ray" or s.resources.gpus % _ray(s).gpus_per_worker_pod == 0,
)
RAY_ONGOING_COVERS_BATCH_RULE = Rule(
    rule=("self.engine != 'ray' || !has(self.runtime.batching) || (has(self.ray) ? self.ray.maxOngoingRequests : 64) >= "
          "(has(self.runtime.batching.maxBatchSize) ? self.runtime.batching.maxBatchSize : "
          f"{DEFAULTS['max_batch_size']})"),
    message=("with engine ray, ray.maxOngoingRequests must be at least runtime.batching.maxBatchSize: Serve never "
             "batches beyond the requests a replica holds"),
    holds=lambda s: (s.engine != "ray" or s.runtime.batching is None
                     or _ray(s).max_ongoing_requests >= (s.runtime.batching.max_batch_size or DEFAULTS["max_batch_size"])),
)
RAY_AUTOSCALING_RULE = Rule(
    rule=("self.engine != 'ray' || !has(self.autoscaling) || ((!has(self.autoscaling.metric) || "
          "self.autoscaling.metric == 'inFlight') && (!has(self.autoscaling.class) || self.autoscaling.class == 'hpa'))"),
    message=("with engine ray, Ray Serve's own autoscaler scales the replicas on requests in flight: set "
             "autoscaling.metric inFlight (Serve's target_ongoing_requests) and leave class out"),
    holds=lambda s: s.engine != "ray" or s.autoscaling is None or (
        s.autoscaling.metric == "inFlight" and s.autoscaling.class_ == "hpa"),
)
RAY_MODEL_RULE = Rule(
    rule=("self.engine != 'ray' || ((!has(self.model.format) || self.model.format != 'kserve') && "
          "(!has(self.model.repository) || !self.model.repository))"),
    message="engine ray serves one model in the forkless formats: format kserve and model repositories need engine deployment",
    holds=lambda s: s.engine != "ray" or (s.model.format != "kserve" and not s.model.repository),
)
RAY_RUNTIME_RULE = Rule(
    rule=("self.engine != 'ray' || ((!has(self.runtime.workers) || type(self.runtime.workers) == int) && "
          "!has(self.runtime.gpuMemoryFraction))"),
    message=("with engine ray, runtime.workers is a number of Serve replicas per replica (auto is decided inside a "
             "runtime pod) and a replica's GPU share is ray.gpusPerReplica, not runtime.gpuMemoryFraction"),
    holds=lambda s: s.engine != "ray" or (not isinstance(s.runtime.workers, str) and s.runtime.gpu_memory_fraction is None),
)
RAY_SPEC_RULES = (RAY_ONLY_WITH_RAY_ENGINE_RULE, RAY_GPUS_SPLIT_RULE, RAY_ONGOING_COVERS_BATCH_RULE,
                  RAY_AUTOSCALING_RULE, RAY_MODEL_RULE, RAY_RUNTIME_RULE)


# --- spec ---------------------------------------------------------------------------------------

REPLICAS_OR_AUTOSCALING_RULE = Rule(
    rule="!(has(self.replicas) && has(self.autoscaling))",
    message="replicas cannot be set together with autoscaling: the autoscaler owns the replica count; remove one of them",
    holds=lambda s: s.replicas is None or s.autoscaling is None,
)
AUTOSCALING_NEEDS_CPU_RULE = Rule(
    rule=("!has(self.autoscaling) || (has(self.autoscaling.metric) && self.autoscaling.metric != 'cpu') || "
          "(has(self.autoscaling.class) && self.autoscaling.class == 'external') || has(self.resources.cpu)"),
    message="autoscaling on cpu requires resources.cpu: the autoscaler measures utilization against the CPU request",
    holds=lambda s: (s.autoscaling is None or s.autoscaling.metric != "cpu" or s.autoscaling.class_ == "external"
                     or s.resources.cpu is not None),
)
GPU_FRACTION_NEEDS_GPUS_RULE = Rule(
    rule="!has(self.runtime.gpuMemoryFraction) || self.resources.gpus > 0",
    message="runtime.gpuMemoryFraction cannot be set without resources.gpus: it caps each worker's share of a GPU",
    holds=lambda s: s.runtime.gpu_memory_fraction is None or s.resources.gpus > 0,
)
GPU_FRACTION_FITS_RULE = Rule(
    rule=(
        "!has(self.runtime.gpuMemoryFraction) || self.resources.gpus == 0 || "
        "(has(self.runtime.workers) && type(self.runtime.workers) == string) || "
        "self.runtime.gpuMemoryFraction * double(((has(self.runtime.workers) ? self.runtime.workers : self.resources.gpus)"
        f" + self.resources.gpus - 1) / self.resources.gpus) <= {1 + FRACTION_EPSILON!r}"
    ),
    message=(
        "runtime.gpuMemoryFraction times the workers sharing one GPU, ceil(workers / gpus), "
        "must be at most 1: the workers would not fit in the GPU's memory"
    ),
    holds=lambda s: (
        s.runtime.gpu_memory_fraction is None
        or s.resources.gpus == 0
        or isinstance(s.runtime.workers, str)
        or s.runtime.gpu_memory_fraction
        * workers_per_gpu(int(effective_workers(s.runtime.workers, s.resources.gpus)), s.resources.gpus)
        <= 1 + FRACTION_EPSILON
    ),
)


FP16_NEEDS_GPUS_RULE = Rule(
    rule="!has(self.runtime.precision) || self.runtime.precision != 'fp16' || self.resources.gpus > 0",
    message="runtime.precision fp16 requires resources.gpus: on a CPU fp16 runs about 2x slower than fp32; use bf16 or int8",
    holds=lambda s: s.runtime.precision != "fp16" or s.resources.gpus > 0,
)
INT8_ON_CPU_RULE = Rule(
    rule="!has(self.runtime.precision) || self.runtime.precision != 'int8' || self.resources.gpus == 0",
    message="runtime.precision int8 is dynamic quantization, which runs on CPUs only: use fp16 or bf16 with resources.gpus",
    holds=lambda s: s.runtime.precision != "int8" or s.resources.gpus == 0,
)
INT8_NOT_EXPORTED_RULE = Rule(
    rule=(
        "!has(self.runtime.precision) || self.runtime.precision != 'int8' || "
        "((!has(self.model.format) || self.model.format != 'torch-export') && !self.model.uri.endsWith('.pt2'))"
    ),
    message="runtime.precision int8 cannot quantize a torch.export program: quantize before export (torchao pt2e) and serve the result",
    holds=lambda s: s.runtime.precision != "int8" or (s.model.format != "torch-export" and not s.model.uri.endswith(".pt2")),
)


class InferenceServiceSpec(_Model):
    """The desired state of one served model."""

    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Pod replicas; 1 when omitted. Cannot be combined with autoscaling. The scale subresource writes it.",
    )
    engine: Literal["deployment", "ray"] = Field(
        default="deployment",
        description=("How the model is served. deployment: a Deployment of forkless-runtime pods (spawned workers, "
                     "V1/V2 over HTTP and gRPC). ray: a KubeRay RayService running Ray Serve (HTTP V1/V2), the same "
                     "model and handler loaded by forkless-runtime's loaders in each Serve replica. Immutable."),
    )
    model: ModelSpec = Field(..., description="The model to serve.")
    runtime: RuntimeSpec = Field(
        default_factory=lambda: RuntimeSpec.model_validate({}),
        description="Runtime settings: image, workers, start method, batching.",
        json_schema_extra={"default": {}},
    )
    resources: ResourcesSpec = Field(
        default_factory=lambda: ResourcesSpec.model_validate({}),
        description="GPUs, CPU and memory of each replica.",
        json_schema_extra={"default": {}},
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Scale on CPU utilization with a HorizontalPodAutoscaler instead of a fixed replica count."
    )
    scheduling: SchedulingSpec | None = Field(default=None, description="Node selection, tolerations, affinity and spreading.")
    service_account_name: str | None = Field(
        default=None, max_length=253, description="ServiceAccount of the pods; the namespace's default when omitted."
    )
    ray: RaySpec | None = Field(
        default=None, description="Ray Serve settings; only with engine ray (all have defaults, so it may be left out).")
    pod_template: PodTemplate | None = Field(
        default=None,
        description=(
            "Labels, annotations, imagePullSecrets, volumes and mounts, sidecars, init containers, runtimeClassName, "
            "security context, CPU, memory and ephemeral-storage limits, merged onto the rendered pod. What the "
            "operator owns (the runtime's command, image, ports and probes, FORKLESS_* variables, GPUs, /dev/shm, "
            "its volumes and selector labels) is refused, with the reason."
        ),
    )

    model_config = ConfigDict(
        json_schema_extra=validations(
            ENGINE_IMMUTABLE_RULE,
            REPLICAS_OR_AUTOSCALING_RULE,
            AUTOSCALING_NEEDS_CPU_RULE,
            GPU_FRACTION_NEEDS_GPUS_RULE,
            GPU_FRACTION_FITS_RULE,
            FP16_NEEDS_GPUS_RULE,
            INT8_ON_CPU_RULE,
            INT8_NOT_EXPORTED_RULE,
            *RAY_SPEC_RULES,
        )
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> InferenceServiceSpec:
        for rule in (
            REPLICAS_OR_AUTOSCALING_RULE,
            AUTOSCALING_NEEDS_CPU_RULE,
            GPU_FRACTION_NEEDS_GPUS_RULE,
            GPU_FRACTION_FITS_RULE,
            FP16_NEEDS_GPUS_RULE,
            INT8_ON_CPU_RULE,
            INT8_NOT_EXPORTED_RULE,
            *RAY_SPEC_RULES,
        ):
            rule.check(self)
        return self

    @property
    def ray_settings(self) -> RaySpec:
        """spec.ray after defaulting (engine ray)."""
        return _ray(self)

    @property
    def workers(self) -> int | str:
        """Worker processes per replica after defaulting: a count, or "auto"."""
        return effective_workers(self.runtime.workers, self.resources.gpus)


# --- status -------------------------------------------------------------------------------------


class Condition(_Model):
    """One observation of the InferenceService's state (metav1.Condition)."""

    type: str = Field(..., max_length=316, pattern=r"^[A-Za-z][A-Za-z0-9]*$", description="Ready or Reconciled.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(
        ..., min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason of the last transition.",
    )
    message: str = Field(default="", max_length=32_768, description="Human-readable details.")
    last_transition_time: str = Field(
        ..., description="When status last changed.", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was computed for."
    )


ModelState = Literal["Pending", "Loading", "Loaded", "FailedToLoad"]


class ModelStates(_Model):
    """KServe's model states: the one serving now and the one being rolled out."""

    active_model_state: ModelState = Field(..., description="State of the model the ready pods serve: Loaded when any pod is ready.")
    target_model_state: ModelState = Field(..., description="State of the model being rolled out.")


class FailureInfo(_Model):
    """Why the model last failed to download or load (KServe's lastFailureInfo)."""

    reason: str = Field(..., description="ModelDownloadFailed, ModelLoadFailed or ModelOutOfMemory.")
    message: str = Field(default="", max_length=4096, description="The first line of the error.")
    exit_code: int | None = Field(default=None, description="Exit code of the container that failed.")
    location: str | None = Field(default=None, description="pod/container where it failed.")
    time: str | None = Field(default=None, description="When the container failed.", json_schema_extra={"format": "date-time"})


class ModelCopies(_Model):
    """How many pods hold the model, and how many of them failed to download or load it."""

    failed_copies: int = Field(..., ge=0, description="Pods whose model failed to download or load.")
    total_copies: int = Field(..., ge=0, description="Pods of the InferenceService.")


class ModelStatus(_Model):
    """The model's state in KServe's shape (status.modelStatus of a KServe InferenceService)."""

    transition_status: Literal["UpToDate", "InProgress", "BlockedByFailedLoad"] = Field(
        ..., description="UpToDate when the model is served as specified; BlockedByFailedLoad when it cannot download or load."
    )
    states: ModelStates = Field(..., description="Active and target model states.")
    last_failure_info: FailureInfo | None = Field(default=None, description="The last download or load failure.")
    copies: ModelCopies = Field(..., description="Pods holding the model, and failed ones.")


class Addressable(_Model):
    """Where clients reach the service, in KServe's shape (status.address of a KServe InferenceService)."""

    url: str = Field(..., max_length=2048, description="In-cluster URL of the {name}-predictor Service, as KServe's.")


class RayServiceStatus(_Model):
    """What KubeRay reports of an engine ray InferenceService's RayService."""

    ray_service: str = Field(..., description="The RayService's name.")
    active_cluster: str | None = Field(default=None, description="The RayCluster serving now.")
    pending_cluster: str | None = Field(default=None, description="The RayCluster being prepared by an upgrade.")
    app_status: str | None = Field(default=None, description="The Serve application's status (RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY...).")
    app_message: str | None = Field(default=None, max_length=4096, description="Serve's message for the application.")
    num_serve_endpoints: int | None = Field(default=None, description="Ready endpoints of the serve Service.")
    observed_generation: int | None = Field(default=None, description="The RayService generation KubeRay last observed.")


class InferenceServiceStatus(_Model):
    """The observed state, computed by the operator and written through /status."""

    observed_generation: int | None = Field(default=None, description="The metadata.generation last reconciled.")
    url: str | None = Field(default=None, description="In-cluster URL of the service.")
    address: Addressable | None = Field(
        default=None, description="KServe's address: the {name}-predictor Service, so KServe clients keep their URL.")
    replicas: int | None = Field(default=None, description="Pods of the Deployment (for the scale subresource).")
    ready_replicas: int | None = Field(default=None, description="Pods ready to serve.")
    replica_summary: str | None = Field(default=None, description="ready/desired replicas, for display.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    gpus: int | None = Field(default=None, description="GPUs requested by all replicas together.")
    workers: int | None = Field(default=None, description="Worker processes per replica.")
    model_status: ModelStatus | None = Field(default=None, description="The model's download and load state, in KServe's shape.")
    ray: RayServiceStatus | None = Field(default=None, description="The RayService's state (engine ray).")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description=("Ready (the updated replicas are available; with engine ray, the RayService is ready, its "
                     "application RUNNING and its generation observed), Reconciled (children applied for this "
                     "generation), and with engine ray Degraded (a Serve deployment is UNHEALTHY) and Upgrading "
                     "(a blue/green switch to a new RayCluster)."),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


# --- the object the operator handles ------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads."""

    model_config = ConfigDict(extra="ignore")

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class InferenceService(BaseModel):
    """An InferenceService as the operator sees it: metadata plus the typed spec."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: InferenceServiceSpec
    status: InferenceServiceStatus | None = None

    @model_validator(mode="after")
    def _root_rules(self) -> InferenceService:
        for rule in ROOT_RULES:
            rule.check(self)
        return self

    @property
    def model_name(self) -> str:
        return self.spec.model.name or self.metadata.name
