"""The agent side: the client loop and `reinitd agent`, against the real server."""

from __future__ import annotations

import asyncio
import json
import shlex
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from reinitd.agent import EXIT_COMMAND_FAILED, EXIT_NOT_WAITING
from reinitd.agent.client import SseParser, reinit_events, wait_for_reinit
from reinitd.agent.runner import Agent, AgentConfig, StateFile
from reinitd.errors import ReinitError, StreamBroken
from reinitd.server.keys import HUB
from reinitd.wire import ReinitEvent
from tests.conftest import ServerFactory, settle
from tests.support import REINIT, Sql, reinitd_process, server_process, until

Client = TestClient[web.Request, web.Application]


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
    await settle(client)
    assert first.runs == 1
    task.cancel()

    second = make_agent(base_url(client), agent.token, tmp_path, recorder(out))
    task = asyncio.create_task(second.run())
    await until(lambda: second.skipped == 1, what="restarted agent saw the claim again")
    assert second.runs == 0
    assert len(lines(out)) == 1
    task.cancel()


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
    task.cancel()


# --- tolerance of what servers send in the wild ---------------------------------------------


def test_parser_tolerates_crlf_comments_retry_and_multiline() -> None:
    """CRLF and CR line ends, comment lines, retry: and multi-line data all parse."""
    parser = SseParser()
    feed = [
        b": hello\r\n",
        b"retry: 1000\r\n",
        b"event: data\r\n",
        b'data: {"a":\r\n',
        b"data: 1}\r\n",
        b"\r\n",
    ]
    frames = [parser.feed(line) for line in feed]
    assert frames[-1] == ("data", '{"a":\n1}')
    assert frames[:-1] == [None] * 5


FakeHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def fake_server() -> AsyncIterator[Callable[[list[bytes]], Awaitable[str]]]:
    """A server that answers the reinit path with scripted raw bodies, one per connection."""
    servers: list[TestServer] = []

    async def start(bodies: list[bytes]) -> str:
        remaining = list(bodies)

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(remaining.pop(0) if remaining else b"")
            if not remaining:
                await asyncio.sleep(3600)  # the last script stays open
            return response

        app = web.Application()
        app.router.add_get(REINIT, handler)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_malformed_frames_do_not_crash_the_client(
    fake_server: Callable[[list[bytes]], Awaitable[str]],
) -> None:
    """Garbage data, bad JSON and an error frame cause reconnects; the good event arrives."""
    ws = uuid.uuid4()
    good = f'event: data\r\ndata: {{"workspace_id":"{ws}","reason":"prebuild_claimed"}}\r\n\r\n'
    url = await fake_server(
        [
            b"event: data\ndata: not json\n\n",
            b'event: data\ndata: {"workspace_id": 5}\n\n',
            b'event: error\ndata: {"message":"x"}\n\n',
            b"\xff\xfe garbage without structure\n\n",
            b": comment\nretry: 10\n\n" + good.encode(),
        ]
    )
    events = reinit_events(url, str(uuid.uuid4()), backoff_floor=0.01, backoff_ceiling=0.02)
    event = await asyncio.wait_for(anext(events), 10)
    assert event == ReinitEvent(ws)
    await events.aclose()


async def test_silent_stream_is_treated_as_dead(
    fake_server: Callable[[list[bytes]], Awaitable[str]],
) -> None:
    """No frame for three ping intervals: the stream is abandoned."""
    url = await fake_server([b""])
    with pytest.raises(StreamBroken, match="no frame"):
        await asyncio.wait_for(wait_for_reinit(url, str(uuid.uuid4()), ping_interval=0.05), 5)


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
    assert json.loads(stdout) == {
        "workspace_id": str(agent.workspace_id),
        "reason": "prebuild_claimed",
        "owner_id": str(owner),
    }
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
