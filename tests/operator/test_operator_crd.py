"""The generated CRD is current, structural, and carries every rule of the models."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from forkless_operator import spec
from forkless_operator.crd import CRD_FILENAME, custom_resource_definition, openapi_schema, render_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / CRD_FILENAME


def test_crd_file_is_current() -> None:
    assert CRD_PATH.read_text() == render_yaml(), "crds/ is stale: run hack/gen-crds.py"


def test_gen_crds_check_mode_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "gen-crds.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_crd_file_is_the_object() -> None:
    assert yaml.safe_load(CRD_PATH.read_text()) == custom_resource_definition()


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    for path, node in walk(openapi_schema()):
        assert "$ref" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        else:
            assert "type" in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not isinstance(node.get("additionalProperties"), bool), path
        assert "title" not in node, path
        assert node.get("default", "unset") is not None, path
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(flag, True), bool), path


def test_every_spec_and_status_field_is_described() -> None:
    for path, node in walk(openapi_schema()):
        if path.startswith((".spec", ".status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), path


def test_lists_are_typed_for_server_side_apply_and_bounded_for_cel() -> None:
    for path, node in walk(openapi_schema()):
        if node.get("type") == "array" and path.startswith(".spec"):
            assert node.get("x-kubernetes-list-type") in ("map", "atomic", "set"), path
            assert "maxItems" in node, path
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), path
        if node.get("type") == "string" and node.get("x-kubernetes-validations"):
            assert "maxLength" in node, f"{path}: CEL on an unbounded string exceeds the cost budget"


def rules_at(schema: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    return {path: node["x-kubernetes-validations"] for path, node in walk(schema) if "x-kubernetes-validations" in node}


def test_every_rule_is_in_the_crd_where_it_belongs() -> None:
    rules = rules_at(openapi_schema())
    expected = {
        "": [spec.RAY_NAME_RULE],
        ".spec": [spec.ENGINE_IMMUTABLE_RULE, spec.REPLICAS_OR_AUTOSCALING_RULE, spec.AUTOSCALING_NEEDS_CPU_RULE,
                  spec.GPU_FRACTION_NEEDS_GPUS_RULE, spec.GPU_FRACTION_FITS_RULE, spec.FP16_NEEDS_GPUS_RULE,
                  spec.INT8_ON_CPU_RULE, spec.INT8_NOT_EXPORTED_RULE, *spec.RAY_SPEC_RULES],
        ".spec.ray": [spec.WHOLE_ABOVE_ONE_RULE, spec.REPLICA_FITS_POD_RULE],
        ".spec.model": [spec.PYTHON_HANDLER_RULE, spec.CACHE_NEEDS_DOWNLOAD_RULE, spec.REPOSITORY_RULE],
        ".spec.model.uri": [spec.URI_SCHEME_RULE, *spec.URI_FORM_RULES],
        ".spec.runtime.workers": list(spec.WORKERS_RULES),
        ".spec.runtime.startMethod": [spec.NO_FORK_RULE, spec.START_METHOD_RULE],
        ".spec.runtime.env": [spec.RESERVED_ENV_RULE],
        ".spec.autoscaling": [spec.MIN_MAX_REPLICAS_RULE, spec.KEDA_NEEDS_LOAD_METRIC_RULE, spec.CPU_TARGET_IS_CPU_RULE,
                              spec.CPU_TARGET_PERCENT_RULE],
        ".spec.podTemplate.metadata.labels": [spec.SELECTOR_LABEL_RULE],
        ".spec.podTemplate.spec.containers": [spec.RUNTIME_COMMAND_RULE, spec.RUNTIME_IMAGE_RULE,
                                              spec.RUNTIME_PROBES_RULE, spec.FORKLESS_ENV_RULE,
                                              spec.GPU_RESOURCE_RULE, spec.SHM_MOUNT_RULE],
        ".spec.podTemplate.spec.initContainers": [spec.INIT_CONTAINER_NAME_RULE, spec.GPU_RESOURCE_RULE],
        ".spec.podTemplate.spec.volumes": [spec.VOLUME_NAME_RULE],
    }
    assert rules == {path: [r.cel() for r in listed] for path, listed in expected.items()}


def test_crd_names_subresources_and_columns() -> None:
    crd = custom_resource_definition()
    assert crd["metadata"]["name"] == "inferenceservices.serving.forkless.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "InferenceService", "inferenceservices", ["fisvc"], ["forkless"])
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Reason", "URL", "Replicas", "GPUs", "Workers", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        field = column["jsonPath"].split(".")[2].split("[")[0]
        assert column["jsonPath"].startswith(".metadata") or field in status, column
