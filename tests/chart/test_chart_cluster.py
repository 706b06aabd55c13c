"""The chart, config/ and examples/ against the local control plane.

Server-side dry runs validate every rendered object against the real schemas;
install, upgrade and uninstall run as a user would; `kubectl auth can-i` and
server-side applies made *as* the operator's ServiceAccount prove what it may
and may not do. The operator pod becomes Ready on a kwok node (kwok fakes pod
status), so the image need not exist; nothing runs in it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from forkless_operator.render import render_children
from forkless_operator.spec import InferenceService
from forkless_operator.status import APPLIED, compute_status

from tests.chart.conftest import CHART, REPO, Helm
from tests.conftest import Kube, KubectlError

pytestmark = pytest.mark.cluster

WaitFor = Callable[..., Any]
ISVC = "inferenceservices.serving.forkless.dev"
PEERING_API = "kopf.dev/v1/ClusterKopfPeering"


@pytest.fixture(scope="module", autouse=True)
def crds(kube: Kube) -> None:
    """The InferenceService CRD and kopf's peering CRDs, established before any test here."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO / "config" / "kopf-peering"))
    for crd in (ISVC, "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        kube.wait_established(crd, 30)


@pytest.fixture
def extra_namespace(kube: Kube, namespace: str) -> Iterator[str]:
    """A second namespace, for the watched-namespaces mode."""
    name = f"{namespace[:50]}-w"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "forkless.test/scratch=true")
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def release_name() -> str:
    """Unique per test: the chart's ClusterRoles are named after the release (and so is the peering here)."""
    return f"fl-{secrets.token_hex(3)}"


def service_account(namespace: str, release: str) -> str:
    return f"system:serviceaccount:{namespace}:{release}-forkless"


def can(kube: Kube, account: str, verb: str, resource: str, *args: str) -> bool:
    """What the API server's authorizer answers for ``account`` (a SubjectAccessReview, as
    `kubectl auth can-i` sends, but without discovery: KEDA's ScaledObjects are checked on a
    cluster without KEDA). ``args``: --subresource=S, -n NAMESPACE or --all-namespaces."""
    name, _, group = resource.partition(".")
    attributes = {"verb": verb, "resource": name, "group": group}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--subresource="):
            attributes["subresource"] = arg.split("=", 1)[1]
        elif arg == "-n":
            attributes["namespace"] = rest.pop(0)
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": account, "groups": ["system:serviceaccounts", "system:authenticated",
                                                   f"system:serviceaccounts:{account.split(':')[2]}"],
                       "resourceAttributes": attributes}}
    answer = json.loads(kube.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout)
    return bool(answer["status"].get("allowed"))


def dry_run(kube: Kube, manifests: str) -> str:
    return kube.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests).stdout


def install(helm: Helm, kube: Kube, release: str, namespace: str, *values: str) -> str:
    return helm(
        "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "90s", *values,
        kubeconfig=kube.kubeconfig,
    ).stdout


@pytest.fixture
def uninstall(helm: Helm, kube: Kube) -> Iterator[list[tuple[str, str]]]:
    """Releases (name, namespace) a test installed; uninstalled at the end, whatever happened."""
    releases: list[tuple[str, str]] = []
    yield releases
    for release, namespace in releases:
        helm("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig, check=False)


# --- every rendered object is valid for the API server ------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "replicas=3", "--set", "peering.enabled=true", "--set", "metrics.enabled=false"],
        ["--set", "WATCHED", "--set", "peering.enabled=true", "--set", "replicas=2"],
        ["--set-json", 'defaults.tolerations=[{"key":"pool","operator":"Equal","value":"ml","effect":"NoSchedule"}]',
         "--set", "serviceAccount.annotations.example\\.com/role=operator"],
    ],
    ids=["defaults", "peering", "watch-namespaces", "tolerations"],
)
def test_rendered_objects_pass_server_side_dry_run(
    kube: Kube, helm: Helm, namespace: str, extra_namespace: str, values: list[str]
) -> None:
    values = [f"watchNamespaces={{{namespace},{extra_namespace}}}" if v == "WATCHED" else v for v in values]
    manifests = helm(
        "template", release_name(), str(CHART), "--namespace", namespace,
        "--api-versions", PEERING_API, *values,
    ).stdout
    out = dry_run(kube, manifests)
    assert "deployment.apps/" in out and "(server dry run)" in out


def test_kustomize_config_passes_server_side_dry_run(kube: Kube, namespace: str) -> None:
    """config/default as a Flux or Kustomize user applies it, moved into this test's namespace."""
    rendered = [obj for obj in yaml.safe_load_all(kube.kubectl("kustomize", str(REPO / "config" / "default")).stdout)]
    kinds = sorted(obj["kind"] for obj in rendered)
    assert kinds == sorted([
        "Namespace", "CustomResourceDefinition", "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRole",
        "ClusterRoleBinding", "ClusterRoleBinding", "Service", "Service", "Deployment",
    ])
    moved = []
    for obj in rendered:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == "forkless-system"
            continue
        if "namespace" in obj["metadata"]:
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace
        moved.append(obj)
    out = dry_run(kube, json.dumps({"apiVersion": "v1", "kind": "List", "items": moved}))
    assert out.count("(server dry run)") == len(moved)


# --- install, upgrade, uninstall -----------------------------------------------------------------


def test_install_upgrade_uninstall(
    kube: Kube, helm: Helm, namespace: str, wait_for: WaitFor, uninstall: list[tuple[str, str]]
) -> None:
    # The operator's pod must pass the restricted Pod Security Standard, enforced here.
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    release = release_name()
    uninstall.append((release, namespace))
    selector = f"app.kubernetes.io/instance={release}"

    notes = install(helm, kube, release, namespace, "--set", "metrics.serviceMonitor.enabled=true")
    deployment = kube.json("get", "deployment", f"{release}-forkless", "-n", namespace)
    assert deployment["status"].get("availableReplicas") == 1
    for kind in ("serviceaccount", "configmap", "service"):
        assert kube.json("get", kind, "-n", namespace, "-l", selector)["items"], kind
    assert len(kube.json("get", "clusterroles", "-l", selector)["items"]) == 2
    assert not kube.json("get", "poddisruptionbudgets", "-n", namespace, "-l", selector)["items"]
    assert "kubectl -n default wait fisvc/mlp-cpu --for=condition=Ready" in notes
    assert "WARNING: metrics.serviceMonitor.enabled is set, but this cluster does not serve" in notes

    helm(
        "upgrade", release, str(CHART), "--namespace", namespace, "--reuse-values", "--wait", "--timeout", "90s",
        "--set", "replicas=2", "--set", "peering.enabled=true", "--set", f"peering.name={release}",
        kubeconfig=kube.kubeconfig,
    )
    assert kube.json("get", "poddisruptionbudgets", "-n", namespace, "-l", selector)["items"]
    assert kube.json("get", "clusterkopfpeerings", release)
    deployment = kube.json("get", "deployment", f"{release}-forkless", "-n", namespace)
    assert deployment["status"].get("readyReplicas") == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--peering={release}" in args and "--standalone" not in args

    helm("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=kube.kubeconfig)
    uninstall.clear()

    def leftovers() -> list[str]:
        namespaced = kube.json(
            "get", "deployments,replicasets,pods,services,configmaps,serviceaccounts,poddisruptionbudgets,"
            "roles,rolebindings", "-n", namespace, "-l", selector,
        )["items"]
        cluster = kube.json("get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector)["items"]
        return [f"{obj['kind']}/{obj['metadata']['name']}" for obj in namespaced + cluster]

    wait_for(lambda: not leftovers() or None, 30, f"nothing of release {release} left")
    assert helm("list", "--namespace", namespace, "--short", kubeconfig=kube.kubeconfig).stdout.strip() == ""


# --- the operator's ServiceAccount: what it needs, and no more -----------------------------------

# (verb, resource[, subresource]) for every call the operator makes (handlers.py, apply.py, kopf).
NEEDED = [
    ("get", ISVC), ("list", ISVC), ("watch", ISVC), ("patch", ISVC),
    ("get", ISVC, "status"), ("patch", ISVC, "status"),
    ("update", ISVC, "finalizers"),
    *[(verb, kind) for kind in ("deployments.apps", "services") for verb in ("get", "list", "watch", "create", "patch")],
    *[(verb, kind) for kind in ("horizontalpodautoscalers.autoscaling", "poddisruptionbudgets.policy",
                                "scaledobjects.keda.sh", "rayservices.ray.io")
      for verb in ("get", "list", "watch", "create", "patch", "delete")],
    ("get", "pods"), ("list", "pods"), ("watch", "pods"),
    ("get", "persistentvolumeclaims"),
    # Download credentials as KServe keeps them: by name only (rbac.readStorageCredentials).
    ("get", "serviceaccounts"), ("get", "secrets"),
    ("create", "events"), ("patch", "events"),
]
FORBIDDEN = [
    ("list", "secrets"), ("watch", "secrets"), ("create", "secrets"), ("list", "serviceaccounts"),
    ("create", "pods"), ("delete", "pods"), ("create", "pods", "exec"),
    ("delete", "deployments.apps"), ("delete", ISVC), ("update", ISVC), ("create", ISVC),
    ("update", "configmaps"), ("list", "configmaps"),
    ("create", "roles.rbac.authorization.k8s.io"), ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"), ("create", "serviceaccounts", "token"),
]
FORBIDDEN_CLUSTER = [
    ("get", "nodes"), ("patch", "nodes"), ("list", "nodes"), ("delete", "namespaces"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
]


def can_i_args(check: tuple[str, ...]) -> list[str]:
    verb, resource, *sub = check
    return [verb, resource, *([f"--subresource={sub[0]}"] if sub else [])]


def apply_as(kube: Kube, account: str, objects: list[dict[str, Any]], *extra: str) -> str:
    manifest = "\n---\n".join(json.dumps(obj) for obj in objects)
    return kube.kubectl(
        "apply", "--server-side", "--field-manager=forkless-operator", "--force-conflicts", f"--as={account}",
        *extra, "-f", "-", input=manifest,
    ).stdout


def act_as_the_operator(kube: Kube, account: str, namespace: str) -> None:
    """What a reconcile does, done with the ServiceAccount's own rights (the operator cannot run on kwok)."""
    kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples"))
    # Kinds another project installs (KubeRay's RayService) are applied only where their CRDs are; the
    # right to write them is checked with NEEDED, which asks the authorizer and needs no CRD.
    ray_served = kube.kubectl("get", "crd", "rayservices.ray.io", check=False).returncode == 0
    for body in kube.json("get", ISVC, "-n", namespace)["items"]:
        isvc = InferenceService.model_validate({"metadata": body["metadata"], "spec": body["spec"]})
        children = [child for child in render_children(isvc).values()
                    if child is not None and (child["kind"] != "RayService" or ray_served)]
        if children:
            out = apply_as(kube, account, children)
            assert out.count("serverside-applied") == len(children), out
        status = {
            "apiVersion": body["apiVersion"], "kind": body["kind"],
            "metadata": {"name": isvc.metadata.name, "namespace": namespace},
            "status": compute_status(isvc, None, [], body["metadata"]["generation"], reconciled=APPLIED),
        }
        apply_as(kube, account, [status], "--subresource=status")
    kube.kubectl("delete", "horizontalpodautoscalers", "autoscaled", "-n", namespace, f"--as={account}")


def test_service_account_can_do_what_the_operator_needs_and_no_more(
    kube: Kube, helm: Helm, namespace: str, extra_namespace: str, uninstall: list[tuple[str, str]]
) -> None:
    release = release_name()
    uninstall.append((release, namespace))
    install(
        helm, kube, release, namespace,
        "--set", "replicas=2", "--set", "peering.enabled=true", "--set", f"peering.name={release}",
    )
    account = service_account(namespace, release)

    for check in NEEDED:  # in any namespace, here one the release does not live in
        assert can(kube, account, *can_i_args(check), "-n", extra_namespace), f"cannot {check}"
    for verb in ("list", "watch"):
        assert can(kube, account, verb, ISVC, "--all-namespaces")
    assert can(kube, account, "patch", "clusterkopfpeerings.kopf.dev")
    assert can(kube, account, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    for check in FORBIDDEN:
        assert not can(kube, account, *can_i_args(check), "-n", extra_namespace), f"can {check}"
        assert not can(kube, account, *can_i_args(check), "-n", namespace), f"can {check} in its own namespace"
    for check in FORBIDDEN_CLUSTER:
        assert not can(kube, account, *can_i_args(check)), f"can {check}"

    act_as_the_operator(kube, account, extra_namespace)


def test_watch_namespaces_confine_the_service_account(
    kube: Kube, helm: Helm, namespace: str, extra_namespace: str, uninstall: list[tuple[str, str]]
) -> None:
    """Installed in one namespace, watching another: it may act only in the watched one."""
    release = release_name()
    uninstall.append((release, namespace))
    install(helm, kube, release, namespace, "--set", f"watchNamespaces={{{extra_namespace}}}")
    account = service_account(namespace, release)
    deployment = kube.json("get", "deployment", f"{release}-forkless", "-n", namespace)
    assert f"--namespace={extra_namespace}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    for check in NEEDED:
        assert can(kube, account, *can_i_args(check), "-n", extra_namespace), f"cannot {check} where it watches"
        assert not can(kube, account, *can_i_args(check), "-n", namespace), f"can {check} where it does not watch"
        assert not can(kube, account, *can_i_args(check), "-n", "default"), f"can {check} in default"
    assert not can(kube, account, "list", ISVC, "--all-namespaces")
    assert not can(kube, account, "list", "pods", "--all-namespaces")

    act_as_the_operator(kube, account, extra_namespace)
    kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "mlp-cpu.yaml"))
    body = kube.json("get", ISVC, "mlp-cpu", "-n", namespace)
    isvc = InferenceService.model_validate({"metadata": body["metadata"], "spec": body["spec"]})
    with pytest.raises(KubectlError, match="forbidden"):
        apply_as(kube, account, [render_children(isvc)["Deployment"]])


# --- GitOps: the repository's own manifests applied as they are ----------------------------------


def test_examples_apply_cleanly_and_reapply_without_changes(kube: Kube, namespace: str) -> None:
    """`kubectl apply -f crds/ && kubectl apply -f examples/` (top level: examples/invalid/ is not read)."""
    kube.kubectl("apply", "-f", str(REPO / "crds"))
    assert "unchanged" in kube.kubectl("apply", "-f", str(REPO / "crds")).stdout
    examples = sorted(Path(REPO / "examples").glob("*.yaml"))
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in examples]

    def state() -> dict[str, tuple[int, str]]:
        items = kube.json("get", ISVC, "-n", namespace)["items"]
        return {i["metadata"]["name"]: (i["metadata"]["generation"], i["metadata"]["resourceVersion"]) for i in items}

    first = kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples")).stdout.splitlines()
    assert sorted(first) == sorted(f"inferenceservice.serving.forkless.dev/{n} created" for n in names)
    created = state()
    assert sorted(created) == sorted(names) and {g for g, _ in created.values()} == {1}

    again = kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples")).stdout.splitlines()
    assert sorted(again) == sorted(f"inferenceservice.serving.forkless.dev/{n} unchanged" for n in names)
    assert state() == created  # not even a resourceVersion moved

    # Server-side apply of the same files (what Argo CD and Flux do): it takes over the fields
    # (one write per object, managedFields only) and never bumps the generation; a second one writes nothing.
    server_side = ["apply", "--server-side", "-n", namespace, "-f", str(REPO / "examples")]
    assert kube.kubectl(*server_side).stdout.count("serverside-applied") == len(names)
    taken_over = state()
    assert {name: g for name, (g, _) in taken_over.items()} == {name: 1 for name in names}
    kube.kubectl(*server_side)
    assert state() == taken_over
