"""Property tests: the pydantic models and the CRD (schema + CEL) agree, on generated specs.

For every generated spec, valid or not:
- the pydantic model and a server-side dry run of the InferenceService (``dryRun=All``,
  ``fieldValidation=Strict``) give the same verdict;
- where both reject because of a CEL rule mirrored in ``spec.py``, the API server's answer
  carries that rule's message (unless a schema error made the server skip CEL, which it says);
- where both accept, every child that ``render.py`` makes of the object *as the API server
  returned it* (defaults applied) passes a server-side dry run of a server-side apply.

Runs against the session's local control plane (``kube``); examples are derandomized so a CI
failure reproduces.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from forkless_operator import spec as spec_module
from forkless_operator.apply import FIELD_MANAGER, Kube, object_path
from forkless_operator.render import render_children
from forkless_operator.settings import Settings
from forkless_operator.spec import API_VERSION, KIND, PLURAL, InferenceService, Rule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

if TYPE_CHECKING:
    from tests.conftest import Kube as TestKube

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "serving.forkless.dev_inferenceservices.yaml"
ISVC = f"{PLURAL}.serving.forkless.dev"
EXAMPLES = 200
SETTINGS = Settings.from_env({"FORKLESS_OPERATOR_RUNTIME_IMAGE": "forkless-runtime:test"})
RULE_MESSAGES = {value.message for value in vars(spec_module).values() if isinstance(value, Rule)}
SKIPPED_CEL = "some validation rules were not checked"
DRY_RUN = [("dryRun", "All"), ("fieldValidation", "Strict")]

# Counts for the report (printed at the end of the module with -s).
TALLY = {"accepted": 0, "rejected": 0, "children_dry_run": 0}


@pytest.fixture(scope="module")
def api(kube: TestKube) -> Iterator[tuple[Kube, str]]:
    """The operator's own API client pointed at the test cluster, and a namespace of the module's."""
    kube.kubectl("apply", "--server-side", "--field-manager=forkless-tests", "-f", str(CRD_PATH))
    kube.wait_established(ISVC, 30)
    namespace = f"crd-properties-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "forkless.test/scratch=true")
    client = config.new_client_from_config(config_file=str(kube.kubeconfig))
    yield Kube(client), namespace
    print(f"\ncrd properties: {TALLY}")
    kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --- the strategy ---------------------------------------------------------------------------------

def weighted(valid: list[Any], invalid: list[Any], absent: bool = True) -> st.SearchStrategy[Any]:
    """Mostly valid values (4:1), some invalid ones, and (if ``absent``) None for "leave it out"."""
    return st.sampled_from(valid * 4 + invalid + ([None, None] if absent else []))


URIS = weighted(
    ["pvc://models/mlp.pt", "file:///models/mlp.pt", "http://example.com/m.onnx", "https://example.com/m.onnx"],
    ["pvc://Models/mlp.pt", "pvc://models", "file://models/mlp.pt", "s3://bucket/m.pt", "ftp://host/m.pt",
     "garbage", ""],
    absent=False,
)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """An InferenceService spec over the fields the CEL rules and the schema constrain, valid or not."""

    def put(target: dict[str, Any], key: str, strategy: st.SearchStrategy[Any]) -> None:
        if (value := draw(strategy)) is not None:
            target[key] = value

    model: dict[str, Any] = {"uri": draw(URIS)}
    put(model, "format", weighted(["torchscript", "onnx", "python"], ["pickle"]))
    put(model, "handler", weighted(["handlers:Echo", "pkg.mod:Model_1"], ["not a handler", "mod:"]))

    runtime: dict[str, Any] = {}
    put(runtime, "startMethod", weighted(["spawn", "forkserver"], ["fork"]))
    put(runtime, "workers", st.none() | st.integers(-1, 9))
    put(runtime, "gpuMemoryFraction", st.none() | st.none() | st.sampled_from([0, 0.1, 0.25, 0.3, 0.5, 1, 1.2]))
    put(runtime, "env", weighted([[{"name": "LOG_LEVEL", "value": "debug"}]], [[{"name": "FORKLESS_WORKERS", "value": "1"}]]))

    resources: dict[str, Any] = {}
    put(resources, "gpus", st.none() | st.integers(0, 4))
    put(resources, "cpu", weighted(["500m", "2", 4], ["two"]))

    spec: dict[str, Any] = {"model": model}
    if runtime or draw(st.booleans()):
        spec["runtime"] = runtime
    if resources:
        spec["resources"] = resources
    put(spec, "replicas", weighted([0, 1, 3], [-1]))
    if draw(st.integers(0, 2)) == 0:
        autoscaling: dict[str, Any] = {"maxReplicas": draw(st.integers(0, 10))}
        put(autoscaling, "minReplicas", st.none() | st.integers(0, 10))
        spec["autoscaling"] = autoscaling
    return spec


# --- the property ---------------------------------------------------------------------------------


def _body(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pydantic_verdict(body: dict[str, Any]) -> tuple[bool, set[str]]:
    """Accepted?, and the messages of the mirrored CEL rules that failed."""
    try:
        InferenceService.model_validate(body)
    except ValidationError as error:
        failed = {e["msg"].removeprefix("Value error, ") for e in error.errors()}
        return False, failed & RULE_MESSAGES
    return True, set()


def server_verdict(api: Kube, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The object as the API server would store it, or None and the server's message."""
    path = f"/apis/{API_VERSION}/namespaces/{body['metadata']['namespace']}/{PLURAL}"
    try:
        return api.request("POST", path, body=body, query=DRY_RUN), ""
    except ApiException as error:
        assert error.status in (400, 422), f"unexpected answer {error.status}: {error.body}"
        return None, str(json.loads(error.body or "{}").get("message", error.body))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_model_and_crd_agree_and_accepted_specs_render_valid_children(
    api: tuple[Kube, str], spec: dict[str, Any]
) -> None:
    client, namespace = api
    body = _body("prop", namespace, spec)
    model_ok, rule_messages = pydantic_verdict(body)
    stored, server_message = server_verdict(client, body)

    assert model_ok == (stored is not None), (
        f"pydantic {'accepts' if model_ok else 'rejects'} but the API server "
        f"{'rejects: ' + server_message if stored is None else 'accepts'}; spec={json.dumps(spec)}"
    )
    if stored is None:
        TALLY["rejected"] += 1
        if SKIPPED_CEL in server_message:  # a schema error stops CEL: only the verdict can be compared
            return
        for message in rule_messages:
            assert message in server_message, f"{message!r} not in the server's answer {server_message!r}"
        return

    TALLY["accepted"] += 1
    stored["metadata"].setdefault("uid", str(uuid.uuid4()))  # dry-run creates may leave it out
    isvc = InferenceService.model_validate(stored)
    for kind, manifest in render_children(isvc, SETTINGS).items():
        if manifest is None:
            continue
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        try:
            client.request("PATCH", path, body=manifest, content_type="application/apply-patch+yaml",
                           query=[*DRY_RUN, ("fieldManager", FIELD_MANAGER), ("force", "true")])
        except ApiException as error:
            pytest.fail(f"rendered {kind} fails a server-side dry run: {error.body}\nspec={json.dumps(spec)}")
        TALLY["children_dry_run"] += 1
