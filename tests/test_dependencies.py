"""The install is reproducible and past every triaged advisory: requirements.lock pins every
dependency pyproject.toml names (main, dev and gguf) within its range, the environment holds
what the lock pins (`make` installs with the lock as constraints), and nothing pinned is older
than advisories.toml's minimum for its package."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "gguf")


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _direct() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_direct_dependency_is_locked_within_its_range_and_bounded_above() -> None:
    pins = _lock()
    for req in _direct():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )
        bounded = any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier)
        assert bounded, f"{req.name} has no tested upper bound in pyproject.toml"


def test_the_environment_is_the_locked_one() -> None:
    for name, version in _lock().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is locked but not installed: run `make install`")
        # a local label (torch's +cpu) names the build, not another release
        assert installed.public == version.public, f"{name}: {installed}, locked {version}"


def test_nothing_locked_is_older_than_a_triaged_advisorys_fix() -> None:
    pins = _lock()
    minimums = tomllib.loads((ROOT / "advisories.toml").read_text())["minimum"]
    assert minimums
    for entry in minimums:
        name = canonicalize_name(entry["package"])
        assert name in pins, f"advisories.toml: {name} is not in requirements.lock"
        assert entry["advisories"] and entry["why"]
        assert pins[name] >= Version(entry["version"]), (
            f"{name}=={pins[name]} is older than {entry['version']}, which fixes "
            f"{', '.join(entry['advisories'])}"
        )
