"""The adapter's paths on a real server: a taken-over stream leaves nothing for the cyclic
collector, and each library runs the path the start-up check chose."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
from email.utils import parsedate_to_datetime

import asyncpg
import pytest
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import HttpRequestParser

from reinitd.server.connection import GuardedHandler, GuardedServer
from reinitd.server.internals import ListenConnection
from reinitd.server.keys import LISTENER
from reinitd.server.stream import Stream
from tests.support import REINIT, ServerFactory, Sql, claimed, open_stream, until

pytestmark = pytest.mark.internals


def alive(kind: type) -> int:
    """Objects of `kind` the collector tracks now (all of them, with the collector off)."""
    return sum(1 for thing in gc.get_objects() if isinstance(thing, kind))


async def test_a_taken_over_stream_leaves_no_cycle_and_no_parser_behind(
    make_server: ServerFactory, sql: Sql
) -> None:
    """With the cyclic collector off, a stream's request handler and its HTTP parser die by
    reference count once the stream took the connection over, and the stream once its client
    hangs up: nothing waits for a collection (which gc.freeze would postpone for good)."""
    client = await make_server()
    server = client.server.runner.server if client.server.runner is not None else None
    assert isinstance(server, GuardedServer)
    agent = await sql.prebuild()
    gc.collect()
    gc.disable()
    try:
        handlers, parsers, streams = alive(GuardedHandler), alive(HttpRequestParser), alive(Stream)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        await until(
            lambda: (
                (alive(GuardedHandler), alive(HttpRequestParser)) == (handlers + 1, parsers + 1)
            ),
            what="a connection has its handler and parser",
        )
        writer.write(
            f"GET {REINIT}?wait=true HTTP/1.1\r\nHost: x\r\n"
            f"Coder-Session-Token: {agent.token}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        await until(lambda: server.streams_taken == 1, what="the stream took its connection")
        await until(
            lambda: (alive(GuardedHandler), alive(HttpRequestParser)) == (handlers, parsers),
            what="the request's handler and parser freed by reference count",
        )
        assert alive(Stream) == streams + 1
        writer.close()
        await writer.wait_closed()
        await until(lambda: alive(Stream) == streams, what="the closed stream freed")
        assert server.streams == 0
    finally:
        gc.enable()


async def test_a_stream_whose_request_body_never_ends_is_let_go_at_once(
    make_server: ServerFactory, sql: Sql
) -> None:
    """A GET that announces a body and sends only part of it still gets its stream, and
    aiohttp lets the connection go when the stream takes it (it does not linger waiting for
    the rest of the body, holding the request's handler meanwhile)."""
    client = await make_server()
    agent = await sql.prebuild()
    gc.collect()
    gc.disable()
    try:
        handlers = alive(GuardedHandler)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            f"GET {REINIT}?wait=true HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            f"Coder-Session-Token: {agent.token}\r\n\r\nonly a part".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        await until(
            lambda: alive(GuardedHandler) == handlers,
            timeout=3,  # aiohttp's lingering would hold it for 10 s
            what="the request's handler let go at once",
        )
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        assert b"event: data" in await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        writer.close()
    finally:
        gc.enable()


@pytest.mark.parametrize("internals_mode", ["auto", "public", "unguarded"], indirect=True)
async def test_each_library_runs_the_path_the_check_chose(
    make_server: ServerFactory, sql: Sql, internals_mode: str
) -> None:
    """`auto`: the stream takes its connection over and NOTIFYs come through ListenConnection;
    `public`, or a failed check: the stream stays in its request and asyncpg's own connection
    class listens; the claim is delivered either way."""
    client = await make_server()
    runner = client.server.runner
    assert runner is not None
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    listening = client.app[LISTENER].connection
    assert listening is not None
    fast = internals_mode == "auto"
    assert (type(listening) is ListenConnection, type(listening) is asyncpg.Connection) == (
        fast,
        not fast,
    )
    assert isinstance(runner.server, GuardedServer) == (internals_mode != "unguarded")
    assert getattr(runner.server, "streams_taken", 0) == (1 if fast else 0)


@pytest.mark.parametrize("internals_mode", ["auto", "public", "unguarded"], indirect=True)
async def test_a_streams_head_is_the_same_on_every_path(
    make_server: ServerFactory, sql: Sql, internals_mode: str
) -> None:
    """The head a taken-over stream writes itself is the one aiohttp writes on the public
    paths, header for header (the date is now's, the request id our own), and its chunked
    body carries the claim."""
    client = await make_server()
    agent = await sql.prebuild()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        f"GET {REINIT}?wait=true HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine\r\n"
        f"Coder-Session-Token: {agent.token}\r\n\r\n".encode()
    )
    status, *lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).split(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    headers = dict(line.decode().split(": ", 1) for line in lines if line)
    date = parsedate_to_datetime(headers.pop("Date"))
    assert abs(date.timestamp() - time.time()) < 5
    assert re.fullmatch("[0-9a-f]{16}", headers.pop("X-Request-ID"))
    assert headers == {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "Transfer-Encoding": "chunked",
        "Server": SERVER_SOFTWARE,
        "Connection": "close",
    }
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 5), 16)
    frame = await reader.readexactly(size + 2)
    event, data = frame.removesuffix(b"\n\n\r\n").split(b"\n")
    assert event == b"event: data"
    assert json.loads(data.removeprefix(b"data: ")) == claimed(agent.workspace_id, owner)
    writer.close()
