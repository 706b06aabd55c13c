"""Which model file a directory holds: the one file with a known extension, or a Triton-style
repository (``<name>/<version>/model.<ext>``, the highest version). Anything else is an error that
lists what was found, so a user sees at once why their layout does not load."""

from __future__ import annotations

import os

from ..settings import EXTENSION_FORMATS

# A listing in an error message names this many files at most.
_LISTED_AT_MOST = 20


class ModelNotFound(ValueError):
    """A directory with no model file, or with more than one candidate."""


def _is_model_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSION_FORMATS and not name.startswith(".")


def _listing(root: str) -> list[str]:
    found: list[str] = []
    for directory, subdirectories, files in os.walk(root, followlinks=True):  # a cache links its entries
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [os.path.relpath(os.path.join(directory, f), root) for f in sorted(files) if not f.startswith(".")]
    return found


def _described(found: list[str]) -> str:
    if not found:
        return "it is empty"
    shown = ", ".join(found[:_LISTED_AT_MOST])
    more = f" and {len(found) - _LISTED_AT_MOST} more" if len(found) > _LISTED_AT_MOST else ""
    return f"found: {shown}{more}"


def _triton_candidate(root: str, found: list[str]) -> str | None:
    """``<name>/<version>/model.<ext>`` with one model name: the file of its highest numeric version."""
    versions: dict[str, list[tuple[int, str]]] = {}
    for relative in found:
        parts = relative.split(os.sep)
        if len(parts) == 3 and parts[1].isdigit() and _is_model_file(parts[2]) and parts[2].startswith("model."):
            versions.setdefault(parts[0], []).append((int(parts[1]), relative))
    if len(versions) != 1:
        return None
    (entries,) = versions.values()
    return os.path.join(root, max(entries)[1])


def resolve_model_file(path: str) -> str:
    """``path`` itself when it is a file; the one model file of a directory otherwise."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ModelNotFound(f"{path} does not exist")
    found = _listing(path)
    models = [relative for relative in found if _is_model_file(os.path.basename(relative))]
    if len(models) == 1:
        return os.path.join(path, models[0])
    triton = _triton_candidate(path, models)
    if triton is not None:
        return triton
    extensions = ", ".join(EXTENSION_FORMATS)
    if not models:
        raise ModelNotFound(f"{path} holds no model file (one of {extensions}); {_described(found)}")
    raise ModelNotFound(
        f"{path} holds {len(models)} model files and cannot tell which to serve: {_described(models)}; "
        "point the uri at one file, or use one Triton-style <name>/<version>/model.<ext> tree"
    )
