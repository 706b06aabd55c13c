"""What every real-node module does first: the CRD as this checkout generates it, and the chart's
operator from its built image, watching the module's own namespace."""

from __future__ import annotations

from tests.conftest import CHART, REPO, Helm, Kube

LOCAL_VALUES = REPO / "hack" / "local-values.yaml"


def install_operator(kube: Kube, helm: Helm, namespace: str, release: str, *values: str) -> None:
    # Server-side apply of the CRD: other modules' tests may have applied an older one.
    kube.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=forkless-tests",
                 "-f", str(REPO / "crds"))
    helm("install", release, str(CHART), "--namespace", namespace, "-f", str(LOCAL_VALUES), "--skip-crds",
         "--set", f"watchNamespaces={{{namespace}}}", *values, "--wait", "--timeout", "180s",
         kubeconfig=kube.kubeconfig, timeout=200)


def service_url(kube: Kube, namespace: str, name: str, timeout: float = 60) -> str:
    """The Service's ClusterIP URL once it answers: Ready (or Available) says the pods serve, and the
    endpoints controller and kube-proxy route the address a moment later, longer on a busy machine."""
    import httpx

    from tests.conftest import wait_for

    url = f"http://{kube.json('get', 'service', name, '-n', namespace)['spec']['clusterIP']}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, timeout, f"Service {namespace}/{name}'s ClusterIP routed by kube-proxy")
    return url
