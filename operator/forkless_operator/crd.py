"""The InferenceService CRD, generated from the pydantic models in ``spec``.

pydantic writes JSON Schema 2020-12; the API server wants a *structural* OpenAPI
v3.0 schema: every node typed, no ``$ref``, no ``anyOf`` except for
int-or-string, no ``additionalProperties`` next to ``properties``, boolean
``exclusiveMinimum``. ``structural`` converts one into the other, so the models
stay the only place where the API is written down.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from forkless_operator.spec import (
    API_VERSION,
    CATEGORIES,
    DNS1035_LABEL,
    GROUP,
    KIND,
    PLURAL,
    ROOT_RULES,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    InferenceServiceSpec,
    InferenceServiceStatus,
    validations,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"

# JSON Schema keywords that mean nothing to the API server, or that it rejects.
_DROPPED_KEYWORDS = {"title", "additionalProperties", "$defs"}

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
    {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
    {"name": "Replicas", "type": "string", "jsonPath": ".status.replicaSummary",
     "description": "ready/desired replicas"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus", "description": "GPUs of all replicas"},
    {"name": "Workers", "type": "integer", "jsonPath": ".status.workers", "description": "worker processes per replica"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _key_order(item: tuple[str, Any]) -> tuple[int, str]:
    """type and description first, then the rest alphabetically: a stable, readable file."""
    first = {"type": 0, "description": 1}
    return (first.get(item[0], 2), item[0])


def structural(model_schema: dict[str, Any]) -> dict[str, Any]:
    """Turn a pydantic ``model_json_schema(by_alias=True)`` into a structural schema."""
    defs = model_schema.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        # Inline references; the field's own keywords (description, default) win over the model's.
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
            node = {**copy.deepcopy(target), **node}
        # Optional[X] is X: absence, not null, means "not set" in Kubernetes.
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"cannot express anyOf {branches} in a structural schema")
            inner = branches[0]
            if "$ref" in inner:
                inner = {**copy.deepcopy(defs[inner.pop("$ref").rsplit("/", 1)[-1]]), **inner}
            node = {**inner, **node}
        if node.get("default", "missing") is None:
            del node["default"]
        # A free-form map is either opaque (dict[str, Any]) or typed values (dict[str, str]).
        additional = node.get("additionalProperties")
        if additional is True or (node.get("type") == "object" and additional == {}):
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(additional, dict) and "properties" not in node:
            node["additionalProperties"] = convert(additional)
            additional = "keep"
        # OpenAPI v3.0: exclusive bounds are flags on minimum/maximum.
        for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(exclusive), int | float) and not isinstance(node[exclusive], bool):
                node[bound] = node.pop(exclusive)
                node[exclusive] = True
        if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
            node["type"] = "object"
        out: dict[str, Any] = {}
        for key, value in sorted(node.items(), key=_key_order):
            if key in _DROPPED_KEYWORDS and not (key == "additionalProperties" and additional == "keep"):
                continue
            if key == "properties":
                out[key] = {name: convert(prop) for name, prop in value.items()}
            elif key in ("items", "additionalProperties"):
                out[key] = convert(value)
            else:
                out[key] = value
        return out

    return convert({k: v for k, v in model_schema.items() if k != "$defs"})


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of serving.forkless.dev/v1alpha1 InferenceService."""
    spec = structural(InferenceServiceSpec.model_json_schema(by_alias=True))
    status = structural(InferenceServiceStatus.model_json_schema(by_alias=True))
    return {
        "type": "object",
        "description": (
            "An InferenceService serves one PyTorch model with the forkless runtime: a Deployment of "
            "pods whose workers are spawned, never forked, optionally on GPUs."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {
                "type": "object",
                "properties": {
                    # The name becomes a Service name and a label value: a DNS-1035 label.
                    "name": {"type": "string", "maxLength": 63, "pattern": DNS1035_LABEL},
                },
            },
            "spec": spec,
            "status": status,
        },
        **validations(*ROOT_RULES),
    }


def custom_resource_definition() -> dict[str, Any]:
    """The CustomResourceDefinition object, ready to apply."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with multi-line strings kept readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def render_yaml() -> str:
    """The CRD file's exact content (what hack/gen-crds.py writes and the test compares)."""
    header = (
        "# Generated by hack/gen-crds.py from operator/forkless_operator/spec.py. Do not edit.\n"
        f"# {API_VERSION} {KIND}\n"
    )
    body = yaml.dump(custom_resource_definition(), Dumper=_Dumper, sort_keys=False, width=120)
    return header + "---\n" + body
