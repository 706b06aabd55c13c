"""The operator-runtime contract, held in both directions.

The runtime's settings table (``forkless_runtime.settings.FLAGS``) is the contract. These tests
fail on any disagreement between it and what the operator renders, the CRD (descriptions,
defaults, bounds, enums, patterns, the env reservation), the chart's value schema and the docs:

- every runtime flag has exactly one source, a spec field or the operator, and every source
  names a real field of the CRD;
- every field of the spec, on generated InferenceServices (hypothesis, from the CRD's own
  bounds), reaches the runtime through its *own* parser with the value the spec holds, or the
  default the CRD documents when omitted;
- the defaults the CRD's descriptions state are the runtime's, its enums and handler pattern are
  the runtime's, and env reserves exactly the runtime's variables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from forkless_operator.crd import CRD_FILENAME
from forkless_operator.render import RUNTIME_SETTING_SOURCES, runtime_env, runtime_settings
from forkless_operator.settings import Settings
from forkless_operator.spec import OPERATOR_DRAIN_DELAY_S, RUNTIME_ENV_NAMES, InferenceService
from forkless_runtime import cli
from forkless_runtime.settings import (
    DEFAULTS,
    FLAGS,
    FLAGS_BY_FIELD,
    HANDLER_PATTERN,
    env_name,
    env_value,
    flag_name,
    settings_from_args,
)
from forkless_runtime.settings import Settings as RuntimeSettings
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / CRD_FILENAME).read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
SETTINGS = Settings()
# What the operator sets where the spec says nothing, as the sources table documents it.
OPERATOR_VALUES = {"device": None, "host": "0.0.0.0", "port": 8080, "models": ()}
# Spec defaults that are not the runtime's, each documented in its source and the CRD.
DOCUMENTED_DEFAULTS = {"max_batch_size": 1, "drain_delay_s": OPERATOR_DRAIN_DELAY_S, "log_format": SETTINGS.log_format}


def spec_path(field: str) -> list[str] | None:
    """``spec.runtime.maxQueue`` -> ["runtime", "maxQueue"]; None for operator-owned settings."""
    source = RUNTIME_SETTING_SOURCES[field]
    if source.startswith("operator:"):
        return None
    path = source.split()[0]
    assert path.startswith("spec."), f"{field}: source {source!r} must start with spec. or operator:"
    return path.split(".")[1:]


def schema_at(path: list[str]) -> dict[str, Any]:
    node = SPEC_SCHEMA
    for part in path:
        assert part in node.get("properties", {}), f"spec.{'.'.join(path)}: no such field in the CRD"
        node = node["properties"][part]
    return node


def parse_with_runtime(env: list[dict[str, Any]]) -> RuntimeSettings:
    """What ``forkless-runtime serve`` makes of the rendered env, through its own parser."""
    parser = cli.build_parser()
    args = parser.parse_args(["serve"])
    values = {e["name"]: e["value"] for e in env if "value" in e}
    with mock.patch.dict("os.environ", values, clear=True):
        try:
            return settings_from_args(args, parser)
        except SystemExit:
            pytest.fail(f"forkless-runtime refuses the rendered env {values}")


def isvc(spec: dict[str, Any]) -> InferenceService:
    return InferenceService.model_validate({"metadata": {"name": "m", "namespace": "ns", "uid": "u"}, "spec": spec})


def lookup(spec: dict[str, Any], path: list[str]) -> Any:
    node: Any = spec
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --- one source per flag ------------------------------------------------------------------------


def test_every_runtime_flag_has_exactly_one_source() -> None:
    flags = [flag.field for flag in FLAGS]
    assert sorted(RUNTIME_SETTING_SOURCES) == sorted(flags), "runtime flags and the operator's sources differ"
    assert sorted(runtime_settings(isvc({"model": {"uri": "file:///m.pt"}}), SETTINGS)) == sorted(flags)


def test_every_source_names_a_field_of_the_crd() -> None:
    for field in RUNTIME_SETTING_SOURCES:
        path = spec_path(field)
        if path is not None:
            schema_at(path)


# --- values reach the runtime unchanged ---------------------------------------------------------


def bounded_floats(schema: dict[str, Any]) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=schema.get("minimum", 0), max_value=schema.get("maximum", 1e6),
        exclude_min=schema.get("exclusiveMinimum", False), allow_nan=False, allow_infinity=False,
    )


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Valid values of a leaf of the CRD's schema, extremes included."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum", 0), max_value=schema.get("maximum", 10**6))
    if kind == "number":
        return bounded_floats(schema)
    if kind == "boolean":
        return st.booleans()
    raise AssertionError(f"no strategy for {schema}")


RUNTIME_LEAVES = {
    name: from_schema(node)
    for name, node in SPEC_SCHEMA["properties"]["runtime"]["properties"].items()
    if node.get("type") in ("integer", "number", "boolean") or "enum" in node
}
RUNTIME_LEAVES["workers"] = st.one_of(st.integers(1, 256), st.just("auto"))  # int-or-string
BATCHING_LEAVES = {
    name: from_schema(node)
    for name, node in SPEC_SCHEMA["properties"]["runtime"]["properties"]["batching"]["properties"].items()
}
SPECS = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries(
            {"uri": st.sampled_from(["file:///models/m.pt", "pvc://models/a/m.onnx", "https://example.com/m.pt2",
                                     "s3://models/cnn/1/model.pt", "gs://models/m.onnx"])},
            optional={
                "name": st.sampled_from(["mlp", "resnet-50", "a.b_c"]),
                "format": st.sampled_from(schema_at(["model", "format"])["enum"]),
                "handler": st.sampled_from(["pkg.mod:Handler", "m:C", "_a.b.c:_D"]),
            },
        ),
        "runtime": st.fixed_dictionaries(
            {}, optional={**RUNTIME_LEAVES, "batching": st.fixed_dictionaries({}, optional=BATCHING_LEAVES)}
        ),
        "resources": st.fixed_dictionaries({"gpus": st.integers(0, 4)}),
    }
)


@given(SPECS)
@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
def test_every_spec_field_reaches_the_runtime_through_its_own_parser(spec: dict[str, Any]) -> None:
    try:
        service = isvc(spec)
    except ValidationError:
        assume(False)  # e.g. a GPU memory fraction without GPUs: the API server refuses it too
        return
    parsed = parse_with_runtime(runtime_env(service, SETTINGS))
    for flag in FLAGS:
        field = flag.field
        got = getattr(parsed, field)
        path = spec_path(field)
        if path is None:
            want = OPERATOR_VALUES[field]
            if field == "device":
                want = "cuda" if spec["resources"]["gpus"] > 0 else "cpu"
        else:
            value = lookup(spec, path)
            repository = bool(lookup(spec, ["model", "repository"]))
            if field in ("model_name", "model_uri") and repository:
                want = "" if field == "model_uri" else None  # each model's directory names it
                got = got or None if field == "model_name" else got
            elif field == "model_repository":
                want = spec["model"]["uri"].removeprefix("file://") if repository else None
                if repository and want.startswith(("pvc://", "s3://", "gs://", "hf://", "http")):
                    want = runtime_settings(service, SETTINGS)["model_repository"]
            elif field == "signature":
                want = None if value is None else json.dumps(service.spec.model.signature.model_dump(mode="json"),
                                                             separators=(",", ":"))
            elif field == "grpc_port":
                want = 0 if value is False else 8081
            elif field == "model_name":
                want = value or service.metadata.name
            elif field == "model_uri":
                want = runtime_settings(service, SETTINGS)["model_uri"]  # mounted or downloaded: below
                assert want.startswith("file://") and want.endswith(spec["model"]["uri"].rsplit("/", 1)[1])
            elif field == "workers":
                want = value or max(spec["resources"]["gpus"], 1)
            elif value is None:
                want = DOCUMENTED_DEFAULTS.get(field, DEFAULTS[field])
                if field == "max_batch_size" and "batching" in spec["runtime"]:
                    want = DEFAULTS[field]  # batching given without a size: the runtime's default
            else:
                want = value
        assert got == want, f"{flag_name(field)}: spec {spec} gives the runtime {got!r}, not {want!r}"


@given(st.lists(st.lists(st.integers(1, 1_000_000), min_size=1, max_size=8), min_size=1, max_size=16))
@settings(max_examples=100, derandomize=True, deadline=None)
def test_input_shapes_reach_the_runtime_as_the_shapes_it_parses(shapes: list[list[int]]) -> None:
    from forkless_runtime.settings import parse_input_shapes

    parsed = parse_with_runtime(runtime_env(isvc({"model": {"uri": "file:///m.pt", "inputShapes": shapes}}), SETTINGS))
    assert parsed.input_shapes is not None and parse_input_shapes(parsed.input_shapes) == shapes


def test_an_omitted_batching_block_means_batching_off_as_the_crd_says() -> None:
    assert "off" in schema_at(["runtime", "batching"])["description"]
    parsed = parse_with_runtime(runtime_env(isvc({"model": {"uri": "file:///m.pt"}}), SETTINGS))
    assert parsed.max_batch_size == 1


# --- defaults, enums and patterns agree -----------------------------------------------------------

DEFAULT_TEXT = re.compile(r"Default (\S+) \(forkless-runtime (--[a-z0-9-]+)\)\.")


# Spec-mapped settings whose description states no "Default X (forkless-runtime --flag)": the model's
# own identity, a schema default (startMethod), a computed default (workers, threads), none at all
# (a GPU memory cap), or the operator's configuration (logFormat).
NO_STATED_DEFAULT = {"model_name", "model_uri", "format", "handler", "workers", "start_method",
                     "threads_per_worker", "gpu_memory_fraction", "input_shapes", "log_format",
                     "model_repository", "signature", "grpc_port"}


def test_defaults_stated_in_the_crd_are_the_runtimes_or_documented_as_the_operators() -> None:
    for field in RUNTIME_SETTING_SOURCES:
        path = spec_path(field)
        if path is None or field in NO_STATED_DEFAULT:
            continue
        match = DEFAULT_TEXT.search(schema_at(path).get("description", ""))
        assert match, f"spec.{'.'.join(path)}: its description must state its default"
        value, flag = match.groups()
        assert flag == flag_name(field), f"spec.{'.'.join(path)} names {flag}, but renders {flag_name(field)}"
        want = DOCUMENTED_DEFAULTS.get(field, DEFAULTS[field]) if field != "max_batch_size" else DEFAULTS[field]
        assert value == env_value(want), f"spec.{'.'.join(path)} says the default is {value}, the runtime's is {want}"


def test_enums_are_the_runtimes_choices() -> None:
    for field in RUNTIME_SETTING_SOURCES:
        path = spec_path(field)
        flag = FLAGS_BY_FIELD[field]
        if path is not None and "enum" in schema_at(path):
            assert schema_at(path)["enum"] == list(flag.choices), f"spec.{'.'.join(path)} vs {flag_name(field)}"
    # startMethod is a string checked by CEL (so that fork gets its own message): same values.
    assert {"spawn", "forkserver"} == set(FLAGS_BY_FIELD["start_method"].choices)


def test_handler_strings_are_judged_alike_by_the_crd_and_the_runtime() -> None:
    assert schema_at(["model", "handler"])["pattern"] == HANDLER_PATTERN
    parse = FLAGS_BY_FIELD["handler"].parse
    for text in ["pkg.mod:Handler", "a:B", "a..b:C", "a.:C", ".a:C", "a:b.c", "a b:C", "é:C", "a:1C"]:
        crd_accepts = re.fullmatch(HANDLER_PATTERN, text) is not None
        try:
            parse(text)
            runtime_accepts = True
        except Exception:
            runtime_accepts = False
        assert crd_accepts == runtime_accepts, text


def test_env_reserves_exactly_the_runtimes_variables() -> None:
    assert set(RUNTIME_ENV_NAMES) == {env_name(flag.field) for flag in FLAGS}
    rule = schema_at(["runtime", "env"])["x-kubernetes-validations"][0]["rule"]
    assert sorted(re.findall(r"'(FORKLESS_[A-Z_]+)'", rule)) == sorted(RUNTIME_ENV_NAMES)
    base = {"model": {"uri": "file:///m.pt"}}
    isvc({**base, "runtime": {"env": [{"name": "FORKLESS_MY_HANDLER_OPTION", "value": "1"}]}})
    with pytest.raises(ValidationError, match="runtime's settings"):
        isvc({**base, "runtime": {"env": [{"name": "FORKLESS_MAX_QUEUE", "value": "1"}]}})


def test_the_chart_accepts_exactly_the_runtimes_log_formats() -> None:
    schema = json.loads((ROOT / "charts" / "forkless" / "values.schema.json").read_text())
    enum = schema["properties"]["defaults"]["properties"]["runtimeLogFormat"]["enum"]
    assert enum == list(FLAGS_BY_FIELD["log_format"].choices)
    values = yaml.safe_load((ROOT / "charts" / "forkless" / "values.yaml").read_text())
    assert values["defaults"]["runtimeLogFormat"] in enum
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        Settings.from_env({"FORKLESS_OPERATOR_LOG_FORMAT": "plain"})


def test_the_docs_list_every_runtime_flag_with_its_source() -> None:
    docs = (ROOT / "docs" / "operator.md").read_text()
    for field, source in RUNTIME_SETTING_SOURCES.items():
        row = f"| `{flag_name(field)}` | `{env_name(field)}` | {source} |"
        assert row in docs, f"docs/operator.md lacks the row:\n{row}"
