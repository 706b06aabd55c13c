"""Helpers for the chart, image and GitOps tests: a ``helm`` runner and rendered charts.

``helm`` (session) runs .tools/bin/helm with its own config, cache and data
directories (nothing of the user's Helm set-up leaks in) and, when given the
``kube`` fixture's handle, that cluster's kubeconfig. Rendering needs no cluster.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "forkless"
HELM = REPO / ".tools" / "bin" / "helm"
KUBECTL = REPO / ".tools" / "bin" / "kubectl"


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


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects rendered"
    return found[0]


Render = Callable[..., list[dict[str, Any]]]
