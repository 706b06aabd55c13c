"""Fixtures shared by the whole test suite: a real Kubernetes cluster for tests
marked ``@pytest.mark.cluster``, and a deadline-based polling helper.

``kube`` (session scope)
    A :class:`Kube` handle: ``kube.kubeconfig`` (path), ``kube.kubectl_path``,
    ``kube.kubectl(*args)`` (returns a ``CompletedProcess``; raises
    :class:`KubectlError` with stderr on failure unless ``check=False``),
    ``kube.json(*args)`` (``kubectl ... -o json`` parsed), ``kube.apply(*objects)``
    (server-side apply of manifests given as dicts) and ``kube.env`` (this
    environment plus ``KUBECONFIG``, for processes such as an operator).

    Without ``FORKLESS_KUBECONFIG``, the first test that asks for it starts the
    local control plane (``hack/cluster.sh up``: etcd, kube-apiserver,
    kube-controller-manager, kube-scheduler and kwok with simulated GPU nodes)
    in its own state directory, ``.cluster-test/`` (``FORKLESS_CLUSTER_DIR``),
    once for the whole run; it is stopped and removed when the run ends. Runs
    without cluster tests start nothing. The binaries are built (or found in
    the cache) by ``hack/tools.sh`` right after collection, outside any test's
    timeout, since a first build takes minutes.

    ``FORKLESS_KEEP_CLUSTER=1`` leaves it running after the run, for the next run to reuse.

    With ``FORKLESS_KUBECONFIG=/path/to/kubeconfig`` the tests use that cluster
    (for instance one made by ``hack/kind.sh``) and start or stop nothing. The
    ambient ``KUBECONFIG`` and ``~/.kube/config`` are never used, so the suite
    cannot wander into a cluster nobody pointed it at.

    A cluster that cannot start fails the tests with the reason (the tail of
    the failing component's log); it never skips them.

``namespace`` (function scope)
    A fresh namespace per test, with its ``default`` ServiceAccount in place;
    deleted (without waiting) when the test ends.

``helm`` (session)
    Runs .tools/bin/helm with its own config, cache and data directories (nothing of the
    user's Helm set-up leaks in) and, when given the ``kube`` fixture's kubeconfig, that
    cluster. Rendering (``helm.template``) needs no cluster.

``real_node`` (session)
    The local cluster's real node, with the images hack/images.sh built imported into its
    containerd; ``RealNode.scheduling()`` is what lands a pod there.

``wait_for`` (function scope; returns the module's ``wait_for`` function)
    ``wait_for(predicate, timeout, what)`` calls ``predicate`` until it returns
    something truthy and returns that; past the deadline it fails with ``what``
    and the last value seen. Tests wait for conditions this way, never with a
    bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO / "hack" / "cluster.sh"
TOOLS_SH = REPO / "hack" / "tools.sh"
IMAGES_SH = REPO / "hack" / "images.sh"
CHART = REPO / "charts" / "forkless"
HELM = REPO / ".tools" / "bin" / "helm"
KUBECTL = REPO / ".tools" / "bin" / "kubectl"
REAL_NODE_IMAGES = ("runtime", "operator", "ray")
REAL_NODE_LABEL = "forkless.dev/real-node"
TEST_CLUSTER_DIR = REPO / ".cluster-test"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return it.

    Fails with ``what`` ("Deployment gpu Available", ...) and the last value
    when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(
                f"timed out after {timeout:g}s waiting for {what}; last value: {value!r}", pytrace=False
            )
        time.sleep(interval)


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    return wait_for


class KubectlError(AssertionError):
    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(result.args)} exited {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
        self.result = result


@dataclass(frozen=True)
class Kube:
    kubeconfig: Path
    kubectl_path: str
    local: bool  # started by hack/cluster.sh for this run, as opposed to FORKLESS_KUBECONFIG
    env: dict[str, str] = field(repr=False)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if check and result.returncode != 0:
            raise KubectlError(result)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "--output=json").stdout)

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Until the CRD serves its kind. (`kubectl wait --for=condition=Established` fails instead of waiting
        while a new CRD has no conditions yet: "accessor error: <nil> is of the type <nil>".)"""
        deadline = time.monotonic() + timeout
        while True:
            conditions = self.json("get", "crd", crd).get("status", {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return
            assert time.monotonic() < deadline, f"CRD {crd} not Established after {timeout:g} s: {conditions}"
            time.sleep(0.2)

    def apply(self, *objects: dict[str, Any], namespace: str | None = None) -> None:
        """Server-side apply of ``objects``, into ``namespace`` if given."""
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        ns_args = ["--namespace", namespace] if namespace else []
        self.kubectl(
            "apply", "--server-side", "--field-manager=forkless-tests", *ns_args, "-f", "-", input=manifest
        )


def _external_kubeconfig() -> Path | None:
    value = os.environ.get("FORKLESS_KUBECONFIG")
    return Path(value).resolve() if value else None


def _kubectl_for_external_cluster() -> str:
    for candidate in (
        os.environ.get("FORKLESS_KUBECTL"),
        str(REPO / ".tools" / "bin" / "kubectl"),
        shutil.which("kubectl"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "FORKLESS_KUBECONFIG is set but no kubectl found: set FORKLESS_KUBECTL or run hack/tools.sh",
        pytrace=False,
    )


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Build the cluster binaries, and the images if a real-node test will run, before any test.

    A first build takes minutes, more than a test's timeout; done here, it counts
    against none, and its progress is shown rather than captured. The images are
    imported into the real node later, by the ``real_node`` fixture, once it runs.
    """
    if _external_kubeconfig() or not any(item.get_closest_marker("cluster") for item in items):
        return
    steps = [[str(TOOLS_SH)]]
    if any(item.get_closest_marker("realnode") for item in items):
        steps.append([str(REPO / "hack" / "coredns.sh"), "build"])  # the real node's cluster DNS
        steps.append([str(IMAGES_SH), "build", *REAL_NODE_IMAGES])
    capture = config.pluginmanager.getplugin("capturemanager")
    for command in steps:
        with capture.global_and_fixture_disabled():
            result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise pytest.UsageError(f"{' '.join(command)} exited {result.returncode}; its output is above")


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    external = _external_kubeconfig()
    if external:
        yield Kube(
            external,
            _kubectl_for_external_cluster(),
            local=False,
            env={**os.environ, "KUBECONFIG": str(external)},
        )
        return

    state = Path(os.environ.get("FORKLESS_TEST_CLUSTER_DIR", TEST_CLUSTER_DIR))
    cluster_env = {**os.environ, "FORKLESS_CLUSTER_DIR": str(state)}
    up = subprocess.run([str(CLUSTER_SH), "up"], env=cluster_env, capture_output=True, text=True, check=False)
    if up.returncode != 0:
        pytest.fail(f"hack/cluster.sh up exited {up.returncode}:\n{up.stderr[-8000:]}", pytrace=False)
    kubeconfig = state / "kubeconfig"
    try:
        yield Kube(
            kubeconfig,
            str(REPO / ".tools" / "bin" / "kubectl"),
            local=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        )
    finally:
        if os.environ.get("FORKLESS_KEEP_CLUSTER") == "1":
            print(f"FORKLESS_KEEP_CLUSTER=1: the test cluster keeps running in {state}; hack/cluster.sh down stops it")
        else:
            down = subprocess.run(
                [str(CLUSTER_SH), "down"], env=cluster_env, capture_output=True, text=True, check=False
            )
            # Fails the run: the real node must leave the host as it found it (processes, mounts,
            # network namespaces, bridge, cgroups, nftables, ip_forward, paths).
            assert down.returncode == 0, f"hack/cluster.sh down exited {down.returncode}:\n{down.stderr[-4000:]}"


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "forkless.test/scratch=true")
    # Pods are rejected until the namespace's default ServiceAccount exists.
    wait_for(
        lambda: (
            kube.kubectl("get", "serviceaccount", "default", "--namespace", name, check=False).returncode == 0
        ),
        30,
        f"ServiceAccount {name}/default",
    )
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@dataclass(frozen=True)
class RealNode:
    name: str
    state: Path  # the cluster's state directory: the node's containerd socket is under node/

    def ctr(self, *args: str) -> str:
        """``ctr`` against the node's containerd, in Kubernetes' namespace."""
        socket = self.state / "node" / "containerd" / "containerd.sock"
        return subprocess.run(["ctr", "--address", str(socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=True, timeout=30).stdout

    @staticmethod
    def scheduling() -> dict[str, Any]:
        """spec.scheduling (or a pod's nodeSelector and tolerations) that lands on the real node."""
        return {
            "nodeSelector": {REAL_NODE_LABEL: "true"},
            "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
        }


@contextlib.contextmanager
def beside_the_cluster(kube: Kube, script: str) -> Iterator[None]:
    """``hack/<script> up`` for the cluster's state (KEDA, KubeRay: operators built from their Go modules and
    run as processes beside the control plane), ``down`` at the end."""
    command, state = str(REPO / "hack" / script), str(kube.kubeconfig.parent)
    result = subprocess.run([command, "up", state], capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        pytest.fail(f"hack/{script} up exited {result.returncode}:\n{result.stderr[-4000:]}", pytrace=False)
    try:
        yield
    finally:
        subprocess.run([command, "down", state], capture_output=True, text=True, timeout=120, check=False)


def pinned_module_crds(script: str, variable: str, module: str) -> Path:
    """The CRDs of ``module`` at the version ``hack/<script>`` pins in ``variable=`` (as it runs it)."""
    version = next(line.split("=", 1)[1] for line in (REPO / "hack" / script).read_text().splitlines()
                   if line.startswith(f"{variable}="))
    found = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"],
                           capture_output=True, text=True, check=True, timeout=300)
    return Path(json.loads(found.stdout)["Dir"]) / "config" / "crd" / "bases"


@pytest.fixture(scope="session")
def real_node(kube: Kube) -> RealNode:
    """The local cluster's real node (kubelet + containerd), with the forkless images imported.

    The images were built before the run (``pytest_collection_modifyitems``); the import of an
    image the node already holds is skipped.
    """
    if not kube.local:
        pytest.skip("the real-node tests run on the local cluster (hack/cluster.sh), which has one real node")
    nodes = kube.json("get", "nodes", "-l", f"{REAL_NODE_LABEL}=true")["items"]
    if not nodes:
        pytest.fail(f"no node labelled {REAL_NODE_LABEL}=true: was the cluster started with FORKLESS_REAL_NODES=0?",
                    pytrace=False)
    state = kube.kubeconfig.parent
    result = subprocess.run([str(IMAGES_SH), "import", *REAL_NODE_IMAGES], capture_output=True, text=True,
                            env={**os.environ, "FORKLESS_CLUSTER_DIR": str(state)}, check=False)
    if result.returncode != 0:
        pytest.fail(f"hack/images.sh import exited {result.returncode}:\n{result.stderr[-4000:]}", pytrace=False)
    return RealNode(nodes[0]["metadata"]["name"], state)


# --- helm -------------------------------------------------------------------------------------------


class Helm:
    def __init__(self, home: Path) -> None:
        self.env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self.env.pop("KUBECONFIG", None)

    def __call__(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "KUBECONFIG": str(kubeconfig)} if kubeconfig else self.env
        result = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}")
        return result

    def template(self, *args: str, release: str = "t", namespace: str = "forkless-system") -> list[dict[str, Any]]:
        """The chart's objects (CRDs left out), parsed."""
        out = self(
            "template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.36.3", *args
        ).stdout
        return [obj for obj in yaml.safe_load_all(out) if obj]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if not (HELM.exists() and KUBECTL.exists()):
        # Cached binaries are only linked (a second); a first build takes minutes.
        subprocess.run([str(REPO / "hack" / "tools.sh")], check=True)
    return Helm(tmp_path_factory.mktemp("helm"))
