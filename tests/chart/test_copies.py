"""Copies that must not drift: the chart's and config/'s CRDs are byte copies of
crds/ (generated from the pydantic spec by hack/gen-crds.py), and config/operator
is the chart rendered with its defaults. Fix a failure with
`.venv/bin/python config/generate.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.chart.conftest import HELM, REPO, Helm

CRDS = REPO / "crds"
FIX = "stale copy: run .venv/bin/python config/generate.py"


def _generator():
    spec = importlib.util.spec_from_file_location("config_generate", REPO / "config" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("copy", ["charts/forkless/crds", "config/crd"])
def test_crd_copies_are_byte_identical(copy: str) -> None:
    source = {path.name: path.read_bytes() for path in CRDS.glob("*.yaml")}
    assert source, "crds/ is empty"
    copied = {path.name: path.read_bytes() for path in (REPO / copy).glob("*.yaml") if path.name != "kustomization.yaml"}
    assert sorted(copied) == sorted(source), f"{copy} holds other files than crds/: {FIX}"
    for name, content in source.items():
        assert copied[name] == content, f"{copy}/{name} differs from crds/{name}: {FIX}"


def test_generated_config_is_current(helm: Helm) -> None:
    assert HELM.exists()
    for path, content in _generator().expected_files(str(HELM)).items():
        relative = Path(path).relative_to(REPO)
        assert path.exists(), f"{relative} is missing: {FIX}"
        assert path.read_bytes() == content, f"{relative} is out of date: {FIX}"
