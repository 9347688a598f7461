"""The floors CI installs (.ci/floors.txt, .ci/floors-agent.txt) are the ones setup.cfg declares,
on every Python of the matrix."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYTHONS = ("3.11", "3.12", "3.13")


def requirements(text: str) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def floors(reqs: list[Requirement], python: str) -> dict[str, Version]:
    """Each package's lowest version allowed on `python` (`>=` in setup.cfg, `==` in a
    constraints file)."""
    found: dict[str, Version] = {}
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"python_version": python}):
            continue
        for spec in req.specifier:
            if spec.operator in (">=", "=="):
                found[req.name] = Version(spec.version)
    return found


def declared(section: str, key: str) -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return requirements(config[section][key])


@pytest.mark.parametrize("python", PYTHONS)
def test_the_floors_ci_installs_are_the_declared_ones(python: str) -> None:
    """.ci/floors.txt pins the server extra's floors (structlog at the tests' own), and
    .ci/floors-agent.txt the agent install's, as setup.cfg declares them for each Python."""
    server = floors(declared("options.extras_require", "server"), python)
    server["structlog"] = floors(declared("options.extras_require", "dev"), python)["structlog"]
    pinned = floors(requirements((REPO / ".ci" / "floors.txt").read_text()), python)
    assert pinned == server
    agent = floors(declared("options", "install_requires"), python)
    pinned_agent = floors(requirements((REPO / ".ci" / "floors-agent.txt").read_text()), python)
    assert pinned_agent == agent
