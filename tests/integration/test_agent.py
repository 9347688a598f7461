"""The agent side: the client loop and `reinitd agent`, against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import uuid
from pathlib import Path

import pytest

from reinitd.agent import EXIT_COMMAND_FAILED, EXIT_NOT_WAITING
from reinitd.agent.client import wait_for_reinit
from reinitd.agent.runner import Agent, AgentConfig, StateFile
from reinitd.errors import ReinitError
from reinitd.server.keys import HUB
from reinitd.wire import ReinitEvent
from tests.support import (
    Client,
    ServerFactory,
    Sql,
    claimed,
    notifies_applied,
    reinitd_process,
    server_process,
    until,
)


def base_url(client: Client) -> str:
    return str(client.make_url("/")).rstrip("/")


def recorder(path: Path) -> str:
    """A command that appends its reinit environment to `path`."""
    fields = "$REINITD_WORKSPACE_ID $REINITD_OWNER_ID $REINITD_REASON"
    return f'echo "{fields}" >> {shlex.quote(str(path))}'


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def make_agent(url: str, token: str, tmp_path: Path, command: str, **extra: object) -> Agent:
    config = AgentConfig(
        url=url,
        token=token,
        command=command,
        state_file=tmp_path / "state.json",
        backoff_floor=0.05,
        backoff_ceiling=0.2,
        retry_floor=0.01,
        **extra,  # type: ignore[arg-type]
    )
    return Agent(config)


async def test_wait_for_reinit_returns_the_event(client: Client, sql: Sql) -> None:
    """One request returns the claim as an event."""
    agent = await sql.prebuild()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    event = await wait_for_reinit(base_url(client), agent.token)
    assert event == ReinitEvent(agent.workspace_id, owner_id=owner)


async def test_wait_for_reinit_raises_typed_error(client: Client, sql: Sql) -> None:
    """A refusal carries the status and the server's message and detail."""
    agent = await sql.workspace(await sql.user())
    with pytest.raises(ReinitError) as info:
        await wait_for_reinit(base_url(client), agent.token)
    assert info.value.status == 409
    assert info.value.terminal
    assert info.value.message == "Workspace is not a prebuilt workspace waiting to be claimed."
    with pytest.raises(ReinitError) as bad:
        await wait_for_reinit(base_url(client), str(uuid.uuid4()))
    assert bad.value.status == 401
    assert not bad.value.terminal


async def stopped(task: asyncio.Task[int]) -> None:
    """Cancel an agent's task and wait until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_claim_runs_command_once_and_not_after_restart(
    client: Client, sql: Sql, tmp_path: Path
) -> None:
    """claim → CMD ran exactly once with the right environment; a restarted agent skips it."""
    agent = await sql.prebuild()
    out = tmp_path / "ran.txt"
    first = make_agent(base_url(client), agent.token, tmp_path, recorder(out))
    task = asyncio.create_task(first.run())
    await until(lambda: len(client.app[HUB]) == 1, what="agent connected")
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    await until(lambda: first.state.handled != set(), what="claim handled")
    assert lines(out) == [f"{agent.workspace_id} {owner} prebuild_claimed"]
    await sql.notify(str(agent.workspace_id))  # a DBA's re-announcement: the same claim
    await notifies_applied(client)
    assert first.runs == 1
    await stopped(task)

    second = make_agent(base_url(client), agent.token, tmp_path, recorder(out))
    task = asyncio.create_task(second.run())
    await until(lambda: second.skipped == 1, what="restarted agent saw the claim again")
    assert second.runs == 0
    assert len(lines(out)) == 1
    await stopped(task)


@pytest.mark.parametrize("case", ["regular", "failed claim"])
async def test_409_stops_agent_with_documented_exit_code(
    client: Client, sql: Sql, tmp_path: Path, case: str
) -> None:
    """A terminal 409 ends the loop with exit code 3."""
    if case == "regular":
        agent = await sql.workspace(await sql.user())
    else:
        agent = await sql.prebuild()
        build = await sql.claim(agent.workspace_id, await sql.user(), complete=False)
        await sql.complete(build, "boom")
    runner = make_agent(base_url(client), agent.token, tmp_path, "true")
    assert await asyncio.wait_for(runner.run(), 10) == EXIT_NOT_WAITING
    assert runner.runs == 0


async def test_failing_command_is_retried_then_reported(
    client: Client, sql: Sql, tmp_path: Path
) -> None:
    """A failing CMD runs max_attempts times, then the agent exits 4 and the claim stays open."""
    agent = await sql.prebuild()
    await sql.claim(agent.workspace_id, await sql.user())
    out = tmp_path / "attempts.txt"
    runner = make_agent(
        base_url(client), agent.token, tmp_path, f"{recorder(out)}; exit 7", max_attempts=3
    )
    assert await asyncio.wait_for(runner.run(), 20) == EXIT_COMMAND_FAILED
    assert len(lines(out)) == 3
    assert StateFile(tmp_path / "state.json").handled == set()


async def test_agent_survives_server_restart_and_acts_once(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """Server stopped; claim made while it is down; server back: the agent acts exactly once."""
    agent = await sql.prebuild()
    out = tmp_path / "ran.txt"
    async with server_process(database_url, tmp_path) as first:
        runner = make_agent(first.url, agent.token, tmp_path, recorder(out))
        task = asyncio.create_task(runner.run())
        await until(
            lambda: "agent_waiting" in [e["event"] for e in first.log_events()],
            what="agent connected to the first server",
        )
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)  # no server running now
    async with server_process(database_url, tmp_path, port=first.port):
        await until(lambda: len(lines(out)) == 1, timeout=15, what="agent acted after restart")
    assert lines(out) == [f"{agent.workspace_id} {owner} prebuild_claimed"]
    assert runner.runs == 1
    await stopped(task)


# --- tolerance of what servers send in the wild ---------------------------------------------


async def test_cli_once_prints_event_json(
    make_server: ServerFactory, sql: Sql, database_url: str, tmp_path: Path
) -> None:
    """`reinitd agent --once` prints the event as JSON on stdout and exits 0."""
    agent = await sql.prebuild()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    async with server_process(database_url, tmp_path) as server:
        process = await reinitd_process(
            "agent",
            "--url",
            server.url,
            "--once",
            env={"REINITD_AGENT_TOKEN": agent.token, "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr
    assert json.loads(stdout) == claimed(agent.workspace_id, owner)
    assert agent.token not in stderr.decode()


async def test_cli_rejects_bad_usage() -> None:
    """A missing --exec (without --once) is a usage error (exit 2) with a clear message."""
    process = await reinitd_process(
        "agent",
        "--url",
        "http://127.0.0.1:1",
        "--token",
        str(uuid.uuid4()),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert b"give --exec CMD, or --once" in stderr
