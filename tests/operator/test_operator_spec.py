"""The pydantic models reject what the CRD's CEL rules reject, with the same messages."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from forkless_operator import spec
from forkless_operator.spec import InferenceService, InferenceServiceSpec
from forkless_runtime.storage import uris
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# Each invalid example violates exactly one rule; the API server and the model must say the same.
INVALID_EXAMPLES = {
    "fork.yaml": spec.NO_FORK_RULE.message,
    "min-above-max.yaml": spec.MIN_MAX_REPLICAS_RULE.message,
    "bad-scheme.yaml": spec.URI_SCHEME_RULE.message,
    "malformed-hf.yaml": uris.HF_MESSAGE,
    "cache-without-download.yaml": spec.CACHE_NEEDS_DOWNLOAD_RULE.message,
    "memory-overcommit.yaml": spec.GPU_FRACTION_FITS_RULE.message,
    "python-without-handler.yaml": spec.PYTHON_HANDLER_RULE.message,
    "zero-workers.yaml": spec.WORKERS_RULE.message,
    "fp16-on-cpu.yaml": spec.FP16_NEEDS_GPUS_RULE.message,
    "int8-on-gpu.yaml": spec.INT8_ON_CPU_RULE.message,
    "int8-torch-export.yaml": spec.INT8_NOT_EXPORTED_RULE.message,
    "repository-with-name.yaml": spec.REPOSITORY_RULE.message,
    "pod-template-command.yaml": spec.RUNTIME_COMMAND_RULE.message,
    "pod-template-image.yaml": spec.RUNTIME_IMAGE_RULE.message,
    "pod-template-probe.yaml": spec.RUNTIME_PROBES_RULE.message,
    "pod-template-forkless-env.yaml": spec.FORKLESS_ENV_RULE.message,
    "pod-template-gpu.yaml": spec.GPU_RESOURCE_RULE.message,
    "pod-template-shm.yaml": spec.SHM_MOUNT_RULE.message,
    "pod-template-volume.yaml": spec.VOLUME_NAME_RULE.message,
    "pod-template-selector-label.yaml": spec.SELECTOR_LABEL_RULE.message,
    "ray-without-engine.yaml": spec.RAY_ONLY_WITH_RAY_ENGINE_RULE.message,
    "ray-gpus-split.yaml": spec.RAY_GPUS_SPLIT_RULE.message,
    "ray-ongoing-below-batch.yaml": spec.RAY_ONGOING_COVERS_BATCH_RULE.message,
    "ray-autoscaling-cpu.yaml": spec.RAY_AUTOSCALING_RULE.message,
    "ray-kserve-format.yaml": spec.RAY_MODEL_RULE.message,
    "ray-workers-auto.yaml": spec.RAY_RUNTIME_RULE.message,
    "ray-fraction-above-one.yaml": spec.WHOLE_ABOVE_ONE_RULE.message,
    "ray-replica-bigger-than-pod.yaml": spec.REPLICA_FITS_POD_RULE.message,
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def errors_of(body: dict[str, Any]) -> list[str]:
    try:
        InferenceServiceSpec.model_validate(body)
    except ValidationError as error:
        return [e["msg"].removeprefix("Value error, ") for e in error.errors()]
    return []


def minimal(**overrides: Any) -> dict[str, Any]:
    return {"model": {"uri": "file:///models/m.pt"}, **overrides}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    isvc = InferenceService.model_validate(load(path))
    assert isvc.metadata.name == path.stem


def test_every_invalid_example_is_listed() -> None:
    assert {p.name for p in (EXAMPLES / "invalid").glob("*.yaml")} == set(INVALID_EXAMPLES)


@pytest.mark.parametrize(("name", "message"), sorted(INVALID_EXAMPLES.items()))
def test_invalid_examples_fail_with_the_rule_message(name: str, message: str) -> None:
    assert errors_of(load(EXAMPLES / "invalid" / name)["spec"]) == [message]


def test_fork_message_says_why() -> None:
    (message,) = errors_of(minimal(runtime={"startMethod": "fork"}))
    assert "CUDA cannot be re-initialized in a forked child" in message
    assert "OpenMP thread pools deadlock after fork" in message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (minimal(runtime={"startMethod": "threads"}), spec.START_METHOD_RULE.message),
        (minimal(model={"uri": "pvc://Models/m.pt"}), uris.PVC_MESSAGE),
        (minimal(model={"uri": "pvc://models"}), uris.PVC_MESSAGE),
        (minimal(model={"uri": "file://relative/m.pt"}), uris.FILE_MESSAGE),
        (minimal(replicas=2, autoscaling={"maxReplicas": 3}, resources={"cpu": 1}),
         spec.REPLICAS_OR_AUTOSCALING_RULE.message),
        (minimal(autoscaling={"maxReplicas": 3}), spec.AUTOSCALING_NEEDS_CPU_RULE.message),
        (minimal(runtime={"gpuMemoryFraction": 0.5}), spec.GPU_FRACTION_NEEDS_GPUS_RULE.message),
        (minimal(runtime={"env": [{"name": "FORKLESS_WORKERS", "value": "9"}]}), spec.RESERVED_ENV_RULE.message),
    ],
)
def test_cross_field_rules(body: dict[str, Any], message: str) -> None:
    assert errors_of(body) == [message]


def test_unknown_fields_are_errors() -> None:
    assert errors_of(minimal(runtime={"wokers": 2}))


def test_defaults() -> None:
    parsed = InferenceServiceSpec.model_validate(minimal())
    assert parsed.replicas is None
    assert parsed.runtime.start_method == "spawn"
    assert parsed.resources.gpus == 0
    assert parsed.workers == 1
    assert InferenceServiceSpec.model_validate(minimal(resources={"gpus": 3})).workers == 3


def test_model_name_defaults_to_metadata_name() -> None:
    body = {"metadata": {"name": "svc"}, "spec": minimal()}
    assert InferenceService.model_validate(body).model_name == "svc"


@given(
    gpus=st.integers(min_value=1, max_value=16),
    workers=st.one_of(st.none(), st.integers(min_value=1, max_value=256)),
    fraction=st.floats(min_value=0.01, max_value=1.0),
)
def test_gpu_memory_fraction_rule_is_ceil_of_workers_per_gpu(gpus: int, workers: int | None, fraction: float) -> None:
    runtime: dict[str, Any] = {"gpuMemoryFraction": fraction}
    if workers is not None:
        runtime["workers"] = workers
    effective = gpus if workers is None else workers
    fits = fraction * math.ceil(effective / gpus) <= 1 + spec.FRACTION_EPSILON
    assert (errors_of(minimal(runtime=runtime, resources={"gpus": gpus})) == []) == fits


def test_workers_auto_is_accepted_and_any_other_word_refused_with_the_rule() -> None:
    assert InferenceServiceSpec.model_validate(minimal(runtime={"workers": "auto"})).workers == "auto"
    assert errors_of(minimal(runtime={"workers": "many"})) == [spec.WORKERS_AUTO_RULE.message]
    assert errors_of(minimal(runtime={"workers": 257})) == [spec.WORKERS_MAX_RULE.message]
    # auto decides each worker's cap itself: a given fraction is a bound, not a sum to check
    assert not errors_of(minimal(runtime={"workers": "auto", "gpuMemoryFraction": 0.5}, resources={"gpus": 1}))
