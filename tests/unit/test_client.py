"""The agent side: the client loop and `reinitd agent`, against the real server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from reinitd.agent.client import SseParser, reinit_events, wait_for_reinit
from reinitd.errors import StreamBroken
from reinitd.wire import ReinitEvent
from tests.support import REINIT

Client = TestClient[web.Request, web.Application]


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
