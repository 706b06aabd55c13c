"""The runtime's layering, read from the source (every import, nested ones included):

    front-end -> pool -> batching        (the pool drains the passive batcher: one scheduling owner)
          pool, worker -> channel         (the wire both processes share)
    nothing below the front-end imports it; the worker imports neither the front-end, the batcher
    nor the pool; torch is imported only in the worker package.

The front-end reaches the worker's code only by the module name the spawned process runs
(channel.WORKER_MODULE). tests/runtime/test_server.py also proves at run time that the front-end
process never loads libtorch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "runtime" / "forkless_runtime"
HEAVY = {"torch", "onnxruntime", "onnx"}

# Layer of each module (a package's modules share it), and the internal layers it must not import.
FORBIDDEN: dict[str, set[str]] = {
    "frontend": {"worker"},
    "pool": {"frontend", "worker"},
    "batching": {"frontend", "pool", "worker", "channel"},
    "channel": {"frontend", "pool", "batching", "worker"},
    "worker": {"frontend", "pool", "batching"},
    "protocol": {"frontend", "pool", "batching", "worker", "channel"},
    "settings": {"frontend", "pool", "batching", "worker", "channel", "protocol"},
    "errors": {"frontend", "pool", "batching", "worker", "channel", "protocol"},
    "logs": {"frontend", "pool", "batching", "worker", "channel", "protocol"},
    # Shared figures and rules, read by the front-end, the pool and the worker alike: leaves.
    "gpu_memory": {"frontend", "pool", "batching", "worker", "channel", "protocol", "settings"},
    "precision": {"frontend", "pool", "batching", "worker", "channel", "protocol", "settings"},
}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_layers(path: Path) -> set[tuple[str, int]]:
    """(top-level name or forkless_runtime layer, line) of every import in the file."""
    tree = ast.parse(path.read_text())
    found: set[tuple[str, int]] = set()
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name.startswith("forkless_runtime."):
                    found.add((name.split(".")[1], node.lineno))
                else:
                    found.add((name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if len(target) > 1:
                    found.add((target[1], node.lineno))
                else:  # `from .. import x` at the package root: x is a module of the root
                    found.update((alias.name, node.lineno) for alias in node.names)
            elif node.module:
                parts = node.module.split(".")
                found.add((parts[1] if parts[0] == "forkless_runtime" and len(parts) > 1 else parts[0], node.lineno))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) in FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = layer_of(path)
    for name, line in imported_layers(path):
        assert name not in FORBIDDEN[layer], f"{path.relative_to(PACKAGE)}:{line}: {layer} must not import {name}"
        if layer != "worker":
            assert name not in HEAVY, f"{path.relative_to(PACKAGE)}:{line}: only the worker may import {name}"


def test_the_checker_sees_what_it_must_forbid(tmp_path: Path) -> None:
    """The rules above are only as good as the import reader: it finds relative, nested and absolute imports."""
    sample = PACKAGE / "pool" / "supervisor.py"
    names = {name for name, _ in imported_layers(sample)}
    assert {"batching", "channel", "settings", "asyncio"} <= names
    names = {name for name, _ in imported_layers(PACKAGE / "cli.py")}
    assert {"pool", "batching", "frontend"} <= names  # nested, function-level imports included
    names = {name for name, _ in imported_layers(PACKAGE / "worker" / "main.py")}
    assert "torch" in names and "channel" in names
