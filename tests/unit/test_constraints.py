"""constraints.txt pins every dependency pyproject.toml names, and they are what is installed."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIX = "run `make upgrade-deps` and commit constraints.txt"


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert match, f"constraints.txt: {line!r} is not name==version; {FIX}"
            found[canonicalize_name(match[1])] = match[2]
    return found


def declared() -> list[Requirement]:
    """Runtime, dev extra and build backend, as pyproject.toml states them."""
    project = PYPROJECT["project"]
    texts = [
        *project["dependencies"],
        *project["optional-dependencies"]["dev"],
        *PYPROJECT["build-system"]["requires"],
    ]
    return [Requirement(text) for text in texts]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    wrong = []
    for requirement in declared():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            wrong.append(f"{requirement} (pinned: {version})")
    assert not wrong, f"constraints.txt does not satisfy pyproject.toml: {wrong}; {FIX}"


def test_this_environment_has_the_pinned_versions() -> None:
    checked, differing = 0, []
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # build-only (hatchling and its own) or for another platform
        checked += 1
        if installed != version:
            differing.append(f"{name} {installed} (pinned {version})")
    assert not differing, f"installed versions differ from constraints.txt: {differing}; run make"
    assert checked >= len(declared()) - 1  # all but the build backend are installed here
