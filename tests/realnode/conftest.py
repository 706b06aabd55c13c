"""What every real-node module does first: the CRD as this checkout generates it, and the chart's
operator from its built image, watching the module's own namespace."""

from __future__ import annotations

from tests.conftest import CHART, REPO, Helm, Kube

LOCAL_VALUES = REPO / "hack" / "local-values.yaml"


def install_operator(kube: Kube, helm: Helm, namespace: str, release: str) -> None:
    # Server-side apply of the CRD: other modules' tests may have applied an older one.
    kube.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=forkless-tests",
                 "-f", str(REPO / "crds"))
    helm("install", release, str(CHART), "--namespace", namespace, "-f", str(LOCAL_VALUES), "--skip-crds",
         "--set", f"watchNamespaces={{{namespace}}}", "--wait", "--timeout", "180s",
         kubeconfig=kube.kubeconfig, timeout=200)
