#!/usr/bin/env python3
"""`make run`: the whole system on this machine, or the chart on the cluster KUBECONFIG names.

Without KUBECONFIG (no cluster configured), each step is shown as it runs:
  1. start the local cluster (hack/cluster.sh up, state in .cluster/): the control plane, kwok's
     simulated GPU and CPU nodes, and one real node (containerd, kubelet, kube-proxy);
  2. build the runtime and operator images without Docker and import them into the real node
     (hack/images.sh; rebuilt only when their inputs changed);
  3. install the chart with hack/local-values.yaml: the CRDs, and the operator from its image in a
     real pod on the real node, under its own ServiceAccount and RBAC;
  4. build the example models into .models/ and offer them to pods as a user would: a
     PersistentVolume (local, .models/ on the real node) bound to a PersistentVolumeClaim;
  5. apply the CPU example (examples/mlp-cpu.yaml) with its model at pvc://forkless-models/mlp.pt,
     scheduled on the real node;
  6. wait until it is Ready by its pod's own readiness probe, showing the pod's progress;
  7. send one V2 inference to the Service's ClusterIP (through kube-proxy) and print the answer;
  8. `kubectl get fisvc` and the pods. The cluster keeps running: hack/cluster.sh down stops it.
A second `make run` reuses the cluster, the images and the release, and takes seconds.

With KUBECONFIG set: `helm upgrade --install` of charts/forkless into forkless-system (CRDs
included), then the CPU example applied as it is, and how to watch it become Ready.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".cluster"
MODELS = ROOT / ".models"
EXAMPLE = ROOT / "examples" / "mlp-cpu.yaml"
LOCAL_VALUES = ROOT / "hack" / "local-values.yaml"
NAME = "mlp-cpu"
NAMESPACE = "default"
ISVC = "inferenceservices.serving.forkless.dev"
CHART_NAMESPACE = "forkless-system"
RELEASE = "forkless"
MODEL_CLAIM = "forkless-models"
REAL_NODE_LABEL = "forkless.dev/real-node"
READY_TIMEOUT_S = 300

T = TypeVar("T")


class DemoError(RuntimeError):
    pass


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def note(message: str) -> None:
    print(f"    {message}", flush=True)


def tool(name: str) -> str:
    """A binary from .tools/bin (hack/tools.sh builds them), else from PATH."""
    local = ROOT / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DemoError(f"{name} not found in .tools/bin or on PATH (hack/tools.sh builds it)")
    return found


def run(*command: str, env: dict[str, str] | None = None, input: str | None = None, quiet: bool = False) -> str:
    result = subprocess.run(command, env=env, input=input, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr.strip()}")
    if not quiet and result.stdout.strip():
        print(result.stdout.rstrip(), flush=True)
    return result.stdout


def run_shown(*command: str, env: dict[str, str] | None = None) -> None:
    """A long step whose own progress lines go straight to the terminal as they come."""
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise DemoError(f"{' '.join(command)} exited {result.returncode} (its output is above)")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# --- the local demo -------------------------------------------------------------------------------


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_path = tool("kubectl")
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, quiet: bool = False) -> str:
        return run(self.kubectl_path, *args, env=self.env, input=input, quiet=quiet)

    def get(self, *args: str) -> dict[str, Any] | None:
        result = subprocess.run([self.kubectl_path, "get", *args, "-o", "json"], env=self.env,
                                capture_output=True, text=True, check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def apply(self, *objects: dict[str, Any]) -> None:
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=forkless-demo", "-f", "-",
                     input=manifest, quiet=True)


def ready_condition(body: dict[str, Any] | None) -> dict[str, Any] | None:
    for condition in (body or {}).get("status", {}).get("conditions", []):
        if condition["type"] == "Ready":
            return dict(condition)
    return None


def real_node(cluster: Cluster) -> str:
    nodes = (cluster.get("nodes", "-l", f"{REAL_NODE_LABEL}=true") or {}).get("items", [])
    if not nodes:
        raise DemoError(f"no node labelled {REAL_NODE_LABEL}=true: was the cluster started with FORKLESS_REAL_NODES=0?")
    return str(nodes[0]["metadata"]["name"])


def real_node_scheduling() -> dict[str, Any]:
    """spec.scheduling that puts an InferenceService's pods on the local cluster's real node."""
    return {
        "nodeSelector": {REAL_NODE_LABEL: "true"},
        "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
    }


def model_volume(models: Path, node: str, claim: str, namespace: str) -> list[dict[str, Any]]:
    """A local PersistentVolume holding ``models`` on ``node``, and the claim bound to it (read-only)."""
    pv_name = f"{claim}-{namespace}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"app.kubernetes.io/part-of": "forkless-demo"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "local": {"path": str(models)},
                "claimRef": {"namespace": namespace, "name": claim},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                     "resources": {"requests": {"storage": "1Gi"}}},
        },
    ]


def pod_progress(cluster: Cluster) -> str:
    """One line on the InferenceService's pods: node, phase, and why a container is not ready yet."""
    pods = (cluster.get("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={NAME}") or {}).get("items", [])
    if not pods:
        return "no pod yet"
    parts = []
    for pod in pods:
        status = pod.get("status", {})
        detail = status.get("phase", "?")
        for container in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
            state = container.get("state", {})
            waiting = state.get("waiting") or state.get("terminated")
            if waiting:
                detail += f", {container['name']} {waiting.get('reason', '')}"
            elif "running" in state:
                detail += f", {container['name']} running{'' if container.get('ready') else ' (not ready)'}"
        parts.append(f"{pod['metadata']['name']} on {pod['spec'].get('nodeName') or '(unscheduled)'}: {detail}")
    return "; ".join(parts)


def local_demo() -> None:
    step("local cluster: hack/cluster.sh up (control plane, simulated GPU nodes, one real node; state in .cluster/)")
    run_shown(str(ROOT / "hack" / "cluster.sh"), "up", env={**os.environ, "FORKLESS_CLUSTER_DIR": str(STATE)})
    cluster = Cluster(STATE / "kubeconfig")
    node = real_node(cluster)

    step("images: hack/images.sh (forkless-runtime, forkless-operator; rebuilt only when their inputs change)")
    run_shown(str(ROOT / "hack" / "images.sh"), "all", "runtime", "operator",
              env={**os.environ, "FORKLESS_CLUSTER_DIR": str(STATE)})

    # Helm installs a chart's CRDs once and never upgrades them; applied first, they follow this checkout.
    step("kubectl apply --server-side -f crds/ (the CRD, as this checkout generates it)")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=forkless-demo",
                    "-f", str(ROOT / "crds"), quiet=True)
    step(f"helm upgrade --install {RELEASE} charts/forkless -n {CHART_NAMESPACE} -f hack/local-values.yaml "
         "--skip-crds --wait")
    helm_env = {**cluster.env, **helm_home(STATE / "helm")}
    run(tool("helm"), "upgrade", "--install", RELEASE, str(ROOT / "charts" / "forkless"), "-n", CHART_NAMESPACE,
        "--create-namespace", "-f", str(LOCAL_VALUES), "--skip-crds", "--wait", "--timeout", "180s",
        env=helm_env, quiet=True)
    operator = (cluster.get("pods", "-n", CHART_NAMESPACE, "-l", "app.kubernetes.io/name=forkless") or {}).get("items", [])
    for pod in operator:
        note(f"operator pod {pod['metadata']['name']} on {pod['spec'].get('nodeName')}: {pod['status'].get('phase')}")

    step("building the example models into .models/")
    run(sys.executable, "-m", "forkless_runtime.example_models", str(MODELS), quiet=True)
    step(f"model volume: PersistentVolume (local: {MODELS} on {node}) + claim {NAMESPACE}/{MODEL_CLAIM}")
    cluster.apply(*model_volume(MODELS, node, MODEL_CLAIM, NAMESPACE))

    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = NAMESPACE
    body["spec"]["model"]["uri"] = f"pvc://{MODEL_CLAIM}/mlp.pt"
    body["spec"]["scheduling"] = real_node_scheduling()
    # The real node has 2 CPUs and the operator asks for some: request 1 (no CPU limit is set).
    body["spec"]["resources"]["cpu"] = "1"
    step(f"applying InferenceService {NAMESPACE}/{NAME} (examples/mlp-cpu.yaml with model uri "
         f"pvc://{MODEL_CLAIM}/mlp.pt, resources.cpu 1, scheduled on {node})")
    applied = time.monotonic()
    cluster.apply(body)

    step(f"waiting for InferenceService {NAME} to be Ready (its pod's readiness probe: every worker loaded)")
    last = ""

    def isvc_ready() -> dict[str, Any] | None:
        nonlocal last
        progress = pod_progress(cluster)
        if progress != last:
            note(f"[{time.monotonic() - applied:5.1f}s] {progress}")
            last = progress
        condition = ready_condition(cluster.get(ISVC, NAME, "-n", NAMESPACE))
        return condition if condition and condition["status"] == "True" else None

    condition = wait_for(isvc_ready, READY_TIMEOUT_S, f"InferenceService {NAME} Ready")
    note(f"Ready {time.monotonic() - applied:.1f}s after apply: {condition['reason']}: {condition['message']}")

    service = cluster.get("service", NAME, "-n", NAMESPACE)
    if not service:
        raise DemoError(f"Service {NAMESPACE}/{NAME} not found")
    address = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    model_name = body["spec"]["model"]["name"]
    request = {"inputs": [{"name": "input-0", "shape": [1, 16], "datatype": "FP32",
                           "data": [round(0.1 * i, 1) for i in range(16)]}]}
    step(f"POST {address}/v2/models/{model_name}/infer (Service {NAME}'s ClusterIP, through kube-proxy)")
    note(f"request: {json.dumps(request)}")
    status, answer = wait_for(lambda: _answer(f"{address}/v2/models/{model_name}/infer", request), 30,
                              "an answer through the Service")
    note(f"answer ({status}): {json.dumps(answer)}")
    if status != 200:
        raise DemoError(f"inference answered {status}")

    step("kubectl get fisvc -A; kubectl get pods -o wide")
    cluster.kubectl("get", "fisvc", "-A")
    cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={NAME}", "-o", "wide")

    print(flush=True)
    print("The cluster is still running:", flush=True)
    print(f"  export KUBECONFIG={STATE / 'kubeconfig'}", flush=True)
    print(f"  {cluster.kubectl_path} logs -n {NAMESPACE} deploy/{NAME}", flush=True)
    print("Stop it with: hack/cluster.sh down", flush=True)


def _answer(url: str, request: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """The answer, or None while the Service's rules are not yet in place (kube-proxy syncs in ~1 s)."""
    try:
        return http("POST", url, request)
    except OSError:
        return None


def helm_home(directory: Path) -> dict[str, str]:
    """Helm's config, cache and data of this cluster only: nothing of the user's Helm set-up leaks in."""
    return {"HELM_CONFIG_HOME": str(directory / "config"), "HELM_CACHE_HOME": str(directory / "cache"),
            "HELM_DATA_HOME": str(directory / "data")}


# --- an existing cluster --------------------------------------------------------------------------


def cluster_install(kubeconfig: str) -> None:
    helm, kubectl = tool("helm"), tool("kubectl")
    step(f"KUBECONFIG={kubeconfig}: installing the chart there")
    step(f"helm upgrade --install forkless charts/forkless -n {CHART_NAMESPACE} --create-namespace --wait")
    run(helm, "upgrade", "--install", "forkless", str(ROOT / "charts" / "forkless"), "-n", CHART_NAMESPACE,
        "--create-namespace", "--wait")
    step(f"kubectl apply -n {NAMESPACE} -f examples/mlp-cpu.yaml (its model is expected in the runtime image)")
    run(kubectl, "apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
    step("watch it become Ready:")
    print(f"    kubectl -n {NAMESPACE} get fisvc {NAME} --watch", flush=True)
    print(f"    kubectl -n {NAMESPACE} wait fisvc/{NAME} --for=condition=Ready --timeout=10m", flush=True)


def main() -> int:
    kubeconfig = os.environ.get("KUBECONFIG")
    try:
        if kubeconfig:
            cluster_install(kubeconfig)
        else:
            local_demo()
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
