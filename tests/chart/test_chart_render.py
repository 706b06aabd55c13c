"""The chart rendered without a cluster: lint, the schema's messages, and that
what it renders agrees with the operator's CLI, settings and needs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from forkless_operator.cli import build_parser
from forkless_operator.settings import ENV_PREFIX, Settings

from tests.chart.conftest import CHART, Helm, by_kind, one

SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
PEERING_API = "kopf.dev/v1/ClusterKopfPeering"


def operator_args(objects: list[dict[str, Any]]) -> list[str]:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container["args"]


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespaces={team-a,team-b}"]])
def test_lint_strict(helm: Helm, values: list[str]) -> None:
    helm("lint", "--strict", str(CHART), *values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set-json", 'replicas="two"'], "at '/replicas': got string, want integer"),
        (["--set", "replica=2"], "additional properties 'replica' not allowed"),
        (["--set", "watchNamespaces={Team_A}"], "at '/watchNamespaces/0'"),
        (["--set", "metrics.port=70000"], "at '/metrics/port'"),
        (["--set", "defaults.gpuResourceName=gpu"], "at '/defaults/gpuResourceName'"),
        (["--set", "operator.logFormat=xml"], "at '/operator/logFormat'"),
        (["--set", "replicas=2"], "at '/peering/enabled': value must be true"),
        (["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
         "at '/metrics/serviceMonitor/enabled': value must be false"),
    ],
)
def test_bad_values_fail_lint_and_install_naming_the_value(helm: Helm, values: list[str], message: str) -> None:
    for command in (["lint", "--strict", str(CHART)], ["template", "t", str(CHART)]):
        result = helm(*command, *values, check=False)
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert message in result.stderr + result.stdout, result.stderr


def test_peering_without_its_crds_fails_install_saying_how_to_fix_it(helm: Helm) -> None:
    """A cluster capability, not a value: only rendering for a cluster can tell (lint reports it as INFO)."""
    result = helm("template", "t", str(CHART), "--set", "peering.enabled=true", check=False)
    assert result.returncode != 0
    assert "kubectl apply -k config/kopf-peering" in result.stderr


def test_all_namespaces_means_a_cluster_role_and_all_namespaces_flag(helm: Helm) -> None:
    objects = helm.template()
    args = build_parser().parse_args(operator_args(objects))
    assert args.all_namespaces and not args.namespaces
    names = {role["metadata"]["name"] for role in by_kind(objects, "ClusterRole")}
    assert names == {"t-forkless", "t-forkless-discovery"}
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")


def test_watch_namespaces_mean_roles_there_and_namespace_flags(helm: Helm) -> None:
    objects = helm.template("--set", "watchNamespaces={team-a,team-b}")
    args = build_parser().parse_args(operator_args(objects))
    assert args.namespaces == ["team-a", "team-b"] and not args.all_namespaces
    assert sorted(r["metadata"]["namespace"] for r in by_kind(objects, "Role")) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")) == ["team-a", "team-b"]
    # Only the read-only discovery stays cluster-wide: CRDs, and namespaces (kopf lists them once
    # at start-up when given named namespaces; without it, it retries for a minute first).
    [cluster_role] = by_kind(objects, "ClusterRole")
    assert cluster_role["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    ]


def test_rules_grant_no_wildcards_and_secrets_only_by_name(helm: Helm) -> None:
    objects = helm.template("--set", "peering.enabled=true", "--set", "replicas=2", "--api-versions", PEERING_API)
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"nodes", "configmaps"} & set(rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            if "secrets" in rule["resources"]:  # download credentials: get by name, never list or watch
                assert rule == {"apiGroups": [""], "resources": ["serviceaccounts", "secrets"], "verbs": ["get"]}


def test_storage_credentials_can_be_left_unreadable(helm: Helm) -> None:
    objects = helm.template("--set", "rbac.readStorageCredentials=false")
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            assert not {"secrets", "serviceaccounts"} & set(rule["resources"]), rule


def test_peering_flags_objects_and_pdb(helm: Helm) -> None:
    standalone = helm.template()
    assert "--standalone" in operator_args(standalone)
    assert not by_kind(standalone, "PodDisruptionBudget")

    peered = helm.template("--set", "replicas=2", "--set", "peering.enabled=true", "--api-versions", PEERING_API)
    args = build_parser().parse_args(operator_args(peered))
    assert (args.standalone, args.peering) == (False, "forkless-operator")
    assert one(peered, "ClusterKopfPeering")["metadata"]["name"] == "forkless-operator"
    assert one(peered, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1

    namespaced = helm.template(
        "--set", "watchNamespaces={team-a,team-b}", "--set", "peering.enabled=true", "--api-versions", PEERING_API
    )
    assert sorted(p["metadata"]["namespace"] for p in by_kind(namespaced, "KopfPeering")) == ["team-a", "team-b"]
    role = by_kind(namespaced, "Role")[0]
    assert {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]} in (
        role["rules"]
    )


def test_configmap_sets_every_operator_setting(helm: Helm) -> None:
    """Each key is a Settings field (a typo would be ignored silently by the operator), and all are set."""
    data = one(helm.template("--set-json", 'defaults.tolerations=[{"key":"pool","operator":"Exists"}]'),
               "ConfigMap")["data"]
    fields = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert set(data) == fields
    settings = Settings.from_env(data)
    assert settings.default_tolerations == ({"key": "pool", "operator": "Exists"},)
    assert settings.runtime_user == 1000 and settings.gpu_resource_name == "nvidia.com/gpu"


def test_operator_pod_is_locked_down(helm: Helm) -> None:
    pod = one(helm.template(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    args = build_parser().parse_args(container["args"])
    assert args.liveness == f"http://0.0.0.0:{container['ports'][0]['containerPort']}/healthz"
    assert args.metrics_port == next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")


def test_labels_and_immutable_selectors(helm: Helm) -> None:
    objects = helm.template("--set", "replicas=2", "--set", "peering.enabled=true", "--api-versions", PEERING_API)
    for obj in objects:
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "component", "part-of", "version", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], key)
    selector = {"app.kubernetes.io/name": "forkless-operator", "app.kubernetes.io/instance": "t"}
    assert one(objects, "Deployment")["spec"]["selector"]["matchLabels"] == selector
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    for service in by_kind(objects, "Service"):  # metrics and KEDA's scaler
        assert service["spec"]["selector"] == selector


def test_service_monitor_only_when_enabled_and_served(helm: Helm) -> None:
    enabled = ["--set", "metrics.serviceMonitor.enabled=true"]
    assert not by_kind(helm.template(), "ServiceMonitor")
    assert not by_kind(helm.template("--api-versions", SERVICE_MONITOR_API), "ServiceMonitor")
    assert not by_kind(helm.template(*enabled), "ServiceMonitor")
    monitor = one(helm.template(*enabled, "--api-versions", SERVICE_MONITOR_API), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert by_kind(helm.template(*enabled, "--set", "metrics.serviceMonitor.force=true"), "ServiceMonitor")


def test_no_metrics_means_no_port_no_service(helm: Helm) -> None:
    objects = helm.template("--set", "metrics.enabled=false")
    assert [s["metadata"]["name"] for s in by_kind(objects, "Service")] == ["t-forkless-scaler"]
    assert "--metrics-port=0" in operator_args(objects)


def test_the_scaler_is_a_grpc_service_whose_address_the_operator_renders_into_scaled_objects(helm: Helm) -> None:
    objects = helm.template()
    service = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "t-forkless-scaler")
    assert service["spec"]["ports"] == [{"name": "grpc", "port": 9091, "targetPort": "scaler", "protocol": "TCP",
                                         "appProtocol": "kubernetes.io/h2c"}]
    data = one(objects, "ConfigMap")["data"]
    assert data["FORKLESS_OPERATOR_SCALER_ADDRESS"] == "t-forkless-scaler.forkless-system.svc.cluster.local:9091"
    assert data["FORKLESS_OPERATOR_SCALER_PORT"] == "9091"
    off = helm.template("--set", "scaler.enabled=false")
    assert one(off, "ConfigMap")["data"]["FORKLESS_OPERATOR_SCALER_PORT"] == "0"
    assert all(s["metadata"]["name"] != "t-forkless-scaler" for s in by_kind(off, "Service"))
    # Without cluster DNS (the local cluster), a fixed address.
    fixed = helm.template("--set", "scaler.clusterIP=10.96.0.91", "--set", "scaler.address=10.96.0.91:9091")
    assert one(fixed, "ConfigMap")["data"]["FORKLESS_OPERATOR_SCALER_ADDRESS"] == "10.96.0.91:9091"
    assert next(s for s in by_kind(fixed, "Service") if s["metadata"]["name"] == "t-forkless-scaler")[
        "spec"]["clusterIP"] == "10.96.0.91"


def test_every_value_is_in_the_schema_and_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '.'}: schema must reject unknown keys"
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")

    # A comment above every key that holds a value (a parent key's comment may be on its children);
    # `resources` holds a plain Kubernetes ResourceRequirements.
    top_level = ""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z]\w*):(.*)$", line)
        if not match:
            continue
        if not match.group(1):
            top_level = match.group(2)
        elif top_level == "resources":
            continue
        holds_a_value = bool(match.group(3).strip())
        documented = number > 0 and lines[number - 1].strip().startswith("#")
        assert documented or not holds_a_value, f"values.yaml:{number + 1} `{line.strip()}` has no comment"
