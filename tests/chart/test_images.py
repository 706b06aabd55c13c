"""The Dockerfiles, checked statically: pinned bases, a numeric non-root user, and
entrypoints that exist in the package.

`make images` builds them with buildah on a local Debian base, and the real-node
tests (tests/realnode/) run the built images in pods; these checks catch, in a
second and without a build, what would otherwise only show when a pod starts: a
console script renamed in pyproject.toml, a subcommand that no longer exists, a
user the kubelet's runAsNonRoot rejects, a public base that floats, or a runtime
uid/port that differs from what the operator renders.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

DOCKERFILES = {
    "runtime": REPO / "runtime" / "Dockerfile",
    "operator": REPO / "operator" / "Dockerfile",
}


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        logical, pending = [], ""
        for line in path.read_text().splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):
                continue  # a comment inside a continued RUN
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        assert not pending, f"{path}: dangling line continuation"
        instructions = []
        for line in logical:
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
        return cls(instructions)

    def all(self, keyword: str) -> list[str]:
        return [arguments for kw, arguments in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        values = self.all(keyword)
        assert values, f"no {keyword} instruction"
        return values[-1]

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT/CMD must use the JSON form: the shell form would make /bin/sh PID 1,
        which does not forward SIGTERM, and the runtime's drain would never start."""
        raw = self.last(keyword)
        value = json.loads(raw)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), raw
        return value


@pytest.fixture(params=sorted(DOCKERFILES), name="image")
def image_fixture(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    return request.param, Dockerfile.parse(DOCKERFILES[request.param])


def test_base_images_are_pinned(image: tuple[str, Dockerfile]) -> None:
    """The public base (the default of ARG BASE_IMAGE, which hack/images.sh overrides locally)."""
    _, dockerfile = image
    arg_defaults = dict(arg.partition("=")[::2] for arg in dockerfile.all("ARG") if "=" in arg)
    for source in dockerfile.all("FROM"):
        reference = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults.get(m.group(1), m.group(0)), source.split()[0])
        assert "$" not in reference, f"FROM {source}: an ARG without a default"
        if "@sha256:" in reference:
            continue
        name, _, tag = reference.rpartition(":")
        assert name and "/" not in tag, f"FROM {reference}: no tag, so it floats like :latest"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"FROM {reference}: pin a full version (major.minor.patch) or a digest"
        )


def test_runs_as_a_numeric_non_root_user(image: tuple[str, Dockerfile]) -> None:
    """Numeric, because a pod's runAsNonRoot cannot verify a user name without the image's passwd."""
    _, dockerfile = image
    user = dockerfile.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: must be a numeric, non-zero uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}: the group must be numeric and not root"
    last_user_index = max(i for i, (kw, _) in enumerate(dockerfile.instructions) if kw == "USER")
    later_runs = [a for kw, a in dockerfile.instructions[last_user_index:] if kw == "RUN"]
    assert not later_runs, "RUN after USER: installation steps belong before dropping root"


def _resolve(script: str) -> object:
    assert script in SCRIPTS, f"{script} is not a console script in pyproject.toml ({sorted(SCRIPTS)})"
    module_name, _, attribute = SCRIPTS[script].partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    assert callable(target), f"{SCRIPTS[script]} is not callable"
    return importlib.import_module(module_name)


@pytest.mark.parametrize(
    ("name", "script", "command"),
    [("runtime", "forkless-runtime", "serve"), ("operator", "forkless-operator", "run")],
)
def test_entrypoint_is_a_console_script_with_that_subcommand(name: str, script: str, command: str) -> None:
    dockerfile = Dockerfile.parse(DOCKERFILES[name])
    argv = dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD")
    assert argv[:2] == [script, command], f"{name} image runs {shlex.join(argv)}"
    module = _resolve(script)
    parser = module.build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert command in subcommands, f"{script} has no subcommand {command!r} ({sorted(subcommands)})"


@pytest.mark.parametrize(("name", "extra"), [("runtime", "runtime"), ("operator", "operator")])
def test_installs_its_extra_with_the_constraints(name: str, extra: str) -> None:
    """The extra's requirements are read from pyproject.toml and installed under the pins."""
    runs = Dockerfile.parse(DOCKERFILES[name]).all("RUN")
    (dependencies,) = [run for run in runs if f'["optional-dependencies"]["{extra}"]' in run]
    assert "--constraint constraints.txt" in dependencies and "-r requirements.txt" in dependencies
    assert any("--no-deps" in run and " ." in run for run in runs), "forkless itself, without unpinned deps"
    assert extra in PYPROJECT["project"]["optional-dependencies"]


def test_copied_sources_exist(image: tuple[str, Dockerfile]) -> None:
    _, dockerfile = image
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for arguments in dockerfile.all("COPY"):
        *sources, _ = arguments.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            top = source.rstrip("/").split("/")[0]
            assert any(line.startswith(f"!{top}") for line in ignored), f".dockerignore excludes {source}"


def test_runtime_image_matches_what_the_operator_renders() -> None:
    """The operator runs runtime pods as Settings.runtime_user on port HTTP_PORT, with `python` on PATH."""
    from forkless_operator.render import HTTP_PORT
    from forkless_operator.settings import Settings

    dockerfile = Dockerfile.parse(DOCKERFILES["runtime"])
    uid = int(dockerfile.last("USER").partition(":")[0])
    assert uid == Settings().runtime_user
    assert str(HTTP_PORT) in dockerfile.last("EXPOSE").split()
    env = " ".join(dockerfile.all("ENV"))
    assert "PATH=/opt/forkless/bin:" in env, "the venv's python must be on PATH for the download init container"
