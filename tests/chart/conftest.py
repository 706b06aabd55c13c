"""Helpers for the chart, image and GitOps tests: rendered charts (the ``helm`` fixture and
its ``Helm`` runner live in tests/conftest.py, shared with the real-node tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import CHART, HELM, KUBECTL, REPO, Helm

__all__ = ["CHART", "HELM", "KUBECTL", "REPO", "Helm", "Render", "by_kind", "one"]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects rendered"
    return found[0]


Render = Callable[..., list[dict[str, Any]]]
