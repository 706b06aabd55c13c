"""The little logic in handlers.py that is not a kopf decorator."""

from __future__ import annotations

from typing import Any

from forkless_operator.handlers import freshest_deployment


def deployment(generation: int, available: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": {"availableReplicas": available}}


def test_the_watch_view_wins_when_it_has_the_applied_generation() -> None:
    # The pod became ready between the apply and the first status write: the index knows, the apply answer not.
    applied, indexed = deployment(1, 0), deployment(1, 1)
    assert freshest_deployment(applied, indexed) is indexed


def test_the_apply_answer_wins_over_a_watch_view_of_an_older_generation() -> None:
    applied, indexed = deployment(2, 0), deployment(1, 1)
    assert freshest_deployment(applied, indexed) is applied


def test_whichever_exists() -> None:
    only = deployment(1, 0)
    assert freshest_deployment(only, None) is only
    assert freshest_deployment(None, only) is only
    assert freshest_deployment(None, None) is None
