"""Cluster DNS on the real node: CoreDNS (hack/coredns.sh) answers Service names to pods.

A backend pod from the runtime image behind two Services, one with a ClusterIP and one headless,
and a client pod beside it that looks both names up as any program in a pod does (libc, through
the resolv.conf the kubelet wrote). The headless answer is the backend's pod IP: that is how a
KubeRay worker finds its head (<cluster>-head-svc.<namespace>.svc.cluster.local:6379).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from tests.conftest import REPO, Kube, RealNode, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(600)]

PORT = 8080
# Prints the address a name resolves to, or the resolver's error (which the test shows on failure).
LOOKUP = "import socket, sys\ntry: print(socket.gethostbyname(sys.argv[1]))\nexcept OSError as e: print(e)"
FETCH = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=10).status)"


def runtime_image() -> str:
    return subprocess.run([str(REPO / "hack" / "images.sh"), "ref", "runtime"], capture_output=True, text=True,
                          check=True).stdout.strip()


def pod(name: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            **RealNode.scheduling(),
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": name, "image": runtime_image(), "imagePullPolicy": "Never", "command": command}],
        },
    }


def service(name: str, port: int, headless: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {
            "selector": {"app.kubernetes.io/name": "backend"},
            "ports": [{"name": "http", "port": port, "targetPort": PORT}],
            **({"clusterIP": "None"} if headless else {}),
        },
    }


def ready_pod(kube: Kube, namespace: str, name: str) -> bool:
    body = kube.json("get", "pod", name, "-n", namespace)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in body.get("status", {}).get("conditions", []))


def in_client(kube: Kube, namespace: str, script: str, *args: str) -> str:
    return kube.kubectl("exec", "-n", namespace, "client", "--", "python3", "-c", script, *args).stdout.strip()


def test_pods_resolve_a_cluster_ip_and_a_headless_service_by_name(
    kube: Kube, real_node: RealNode, namespace: str
) -> None:
    kube.apply(
        pod("backend", ["python3", "-m", "http.server", str(PORT)]),
        pod("client", ["sleep", "infinity"]),
        service("web", 80, headless=False),
        service("web-headless", PORT, headless=True),
        namespace=namespace,
    )
    wait_for(lambda: ready_pod(kube, namespace, "backend") and ready_pod(kube, namespace, "client"), 120,
             "pods backend and client Ready")
    pod_ip = kube.json("get", "pod", "backend", "-n", namespace)["status"]["podIP"]
    cluster_ip = kube.json("get", "service", "web", "-n", namespace)["spec"]["clusterIP"]
    node = kube.json("get", "node", real_node.name)
    (node_ip,) = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]

    # The kubelet's clusterDNS and clusterDomain, as ClusterFirst pods get them.
    resolv_conf = kube.kubectl("exec", "-n", namespace, "client", "--", "cat", "/etc/resolv.conf").stdout
    assert f"nameserver {node_ip}" in resolv_conf.splitlines(), resolv_conf
    assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in resolv_conf, resolv_conf

    # A Service's name has an answer once CoreDNS has seen the Service (and, for the headless one,
    # the EndpointSlice with the ready backend): each is given a few seconds to get there.
    for name, expected in [
        (f"web.{namespace}.svc.cluster.local", cluster_ip),
        (f"web-headless.{namespace}.svc.cluster.local", pod_ip),
        ("web", cluster_ip),  # the short name, through the search path
    ]:
        deadline = time.monotonic() + 30
        while (answer := in_client(kube, namespace, LOOKUP, name)) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert answer == expected, f"{name} from pod client: {answer!r}, expected {expected}"

    # And the name leads somewhere: kube-proxy takes the ClusterIP to the backend.
    assert in_client(kube, namespace, FETCH, f"http://web.{namespace}.svc.cluster.local/") == "200"
