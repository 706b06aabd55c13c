"""The test cluster is a real Kubernetes control plane, not a mock.

Each test checks one thing the operator will rely on: schema validation with
CEL in the API server, the scheduler's bin-packing of nvidia.com/gpu against
tainted GPU nodes, the controllers (Deployments become Available, owners
garbage-collect their dependents), RBAC, and version reporting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.conftest import Kube

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]

GPU = "nvidia.com/gpu"
# Runs forever on a real node (hack/kind.sh); kwok never pulls it.
PAUSE = "registry.k8s.io/pause:3.10"
WaitFor = Callable[..., Any]  # the wait_for fixture of tests/conftest.py


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def gpu_deployment(name: str, gpus: int) -> dict[str, Any]:
    """A Deployment of one pod asking for ``gpus`` GPUs, the way a GPU workload
    asks for them: a limit, a toleration of the GPU nodes' taint, and a node
    selector on the GPU operator's label."""
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {"name": "model", "image": PAUSE, "resources": {"limits": {GPU: str(gpus)}}}
                    ],
                },
            },
        },
    }


def pods(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return kube.json("get", "pods", "--namespace", namespace, "-l", f"app.kubernetes.io/name={name}")["items"]


def test_kubectl_and_server_report_pinned_version(kube: Kube) -> None:
    version = kube.json("version")
    assert re.fullmatch(r"v\d+\.\d+\.\d+", version["clientVersion"]["gitVersion"]), version
    assert re.fullmatch(r"v\d+\.\d+\.\d+.*", version["serverVersion"]["gitVersion"]), version
    if kube.local:
        go_mod = (REPO / "hack" / "k8s" / "kubernetes" / "go.mod").read_text()
        pinned = re.search(r"^require k8s\.io/kubernetes (v\S+)$", go_mod, re.M)
        assert pinned, "hack/k8s/kubernetes/go.mod does not pin k8s.io/kubernetes"
        assert version["clientVersion"]["gitVersion"] == pinned[1]
        assert version["serverVersion"]["gitVersion"] == pinned[1]


@pytest.fixture
def widget_crd(kube: Kube) -> Iterator[None]:
    """A CRD whose schema carries a CEL rule, as ours will."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.cel.forkless.test"},
        "spec": {
            "group": "cel.forkless.test",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "replicas": {"type": "integer", "minimum": 0},
                                        "minReplicas": {"type": "integer", "minimum": 0},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.replicas",
                                            "message": "replicas must be greater than or equal to minReplicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    kube.apply(crd)
    kube.wait_established("widgets.cel.forkless.test", 30)
    yield
    kube.kubectl("delete", "crd", "widgets.cel.forkless.test", "--wait=false", check=False)


def test_crd_cel_rule_rejects_invalid_object(kube: Kube, namespace: str, widget_crd: None) -> None:
    def widget(name: str, replicas: int, min_replicas: int) -> dict[str, Any]:
        return {
            "apiVersion": "cel.forkless.test/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "minReplicas": min_replicas},
        }

    kube.apply(widget("good", replicas=2, min_replicas=1), namespace=namespace)
    with pytest.raises(AssertionError) as rejected:
        kube.apply(widget("bad", replicas=1, min_replicas=3), namespace=namespace)
    assert "replicas must be greater than or equal to minReplicas" in str(rejected.value)
    assert kube.kubectl("get", "widget", "bad", "--namespace", namespace, check=False).returncode != 0


def test_gpu_deployment_becomes_available_on_a_gpu_node(
    kube: Kube, namespace: str, wait_for: WaitFor
) -> None:
    kube.apply(gpu_deployment("one-gpu", gpus=1), namespace=namespace)

    def available() -> bool:
        deployment = kube.json("get", "deployment", "one-gpu", "--namespace", namespace)
        return (condition(deployment, "Available") or {}).get("status") == "True"

    wait_for(available, 30, "Deployment one-gpu Available")
    [pod] = pods(kube, namespace, "one-gpu")
    assert pod["status"]["phase"] == "Running"
    assert condition(pod, "Ready")["status"] == "True"
    assert pod["status"].get("podIP")
    node = kube.json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert int(node["status"]["allocatable"][GPU]) >= 1


def test_gpu_request_larger_than_any_node_stays_pending(
    kube: Kube, namespace: str, wait_for: WaitFor
) -> None:
    most_gpus_on_a_node = max(
        int(n["status"]["allocatable"].get(GPU, 0)) for n in kube.json("get", "nodes")["items"]
    )
    kube.apply(gpu_deployment("too-many-gpus", gpus=most_gpus_on_a_node + 1), namespace=namespace)

    def unschedulable() -> dict[str, Any] | None:
        for pod in pods(kube, namespace, "too-many-gpus"):
            scheduled = condition(pod, "PodScheduled")
            if scheduled and scheduled["status"] == "False":
                return scheduled
        return None

    scheduled = wait_for(unschedulable, 30, "PodScheduled=False on the too-many-gpus pod")
    assert scheduled["reason"] == "Unschedulable"
    assert f"Insufficient {GPU}" in scheduled["message"]
    [pod] = pods(kube, namespace, "too-many-gpus")
    assert pod["status"]["phase"] == "Pending"
    deployment = kube.json("get", "deployment", "too-many-gpus", "--namespace", namespace)
    assert condition(deployment, "Available")["status"] == "False"


def test_pods_without_toleration_avoid_gpu_nodes(kube: Kube, namespace: str, wait_for: WaitFor) -> None:
    labels = {"app.kubernetes.io/name": "cpu-only"}
    kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "cpu-only", "labels": labels},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": PAUSE}]},
                },
            },
        },
        namespace=namespace,
    )

    def all_running() -> list[dict[str, Any]]:
        listed = pods(kube, namespace, "cpu-only")
        return (
            listed if len(listed) == 3 and all(p["status"].get("phase") == "Running" for p in listed) else []
        )

    for pod in wait_for(all_running, 30, "3 cpu-only pods Running"):
        node = kube.json("get", "node", pod["spec"]["nodeName"])
        assert "nvidia.com/gpu.present" not in node["metadata"]["labels"], pod["spec"]["nodeName"]


def test_deleting_a_deployment_collects_its_replicasets_and_pods(
    kube: Kube, namespace: str, wait_for: WaitFor
) -> None:
    kube.apply(gpu_deployment("collected", gpus=1), namespace=namespace)
    wait_for(lambda: pods(kube, namespace, "collected"), 30, "a pod of Deployment collected")

    kube.kubectl("delete", "deployment", "collected", "--namespace", namespace, "--wait=false")

    def dependents() -> list[str]:
        listed = kube.kubectl(
            "get",
            "replicasets,pods",
            "--namespace",
            namespace,
            "-l",
            "app.kubernetes.io/name=collected",
            "--output=name",
        )
        return listed.stdout.split()

    wait_for(
        lambda: not dependents(), 30, "ReplicaSets and Pods of Deployment collected to be garbage-collected"
    )


def test_deleting_an_owner_collects_a_dependent_configmap(
    kube: Kube, namespace: str, wait_for: WaitFor
) -> None:
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, namespace=namespace)
    owner_uid = kube.json("get", "configmap", "owner", "--namespace", namespace)["metadata"]["uid"]
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "dependent",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
                ],
            },
        },
        namespace=namespace,
    )

    kube.kubectl("delete", "configmap", "owner", "--namespace", namespace)

    wait_for(
        lambda: (
            kube.kubectl("get", "configmap", "dependent", "--namespace", namespace, check=False).returncode
            != 0
        ),
        30,
        "ConfigMap dependent to be garbage-collected",
    )


def test_rbac_denies_a_service_account_without_a_role(kube: Kube, namespace: str, wait_for: WaitFor) -> None:
    kube.kubectl("create", "serviceaccount", "nobody", "--namespace", namespace)
    kube.kubectl("create", "serviceaccount", "reader", "--namespace", namespace)
    kube.kubectl(
        "create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "--namespace", namespace
    )
    kube.kubectl(
        "create",
        "rolebinding",
        "reader",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
        "--namespace",
        namespace,
    )

    def can_list_pods(account: str) -> str:
        result = kube.kubectl(
            "auth", "can-i", "list", "pods", "--namespace", namespace,
            f"--as=system:serviceaccount:{namespace}:{account}", check=False,
        )  # fmt: skip
        return result.stdout.strip()

    assert can_list_pods("nobody") == "no"
    # The same question answered "yes" once a role grants it: RBAC is evaluated, not just denying.
    wait_for(lambda: can_list_pods("reader") == "yes", 10, "RoleBinding reader to take effect")
    assert can_list_pods("nobody") == "no"
