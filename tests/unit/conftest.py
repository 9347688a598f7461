"""Unit fixtures: a scripted fake reinit server for the agent side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from reinitd.wire import REINIT_PATH

# One answer per request: raw SSE bytes for a 200 stream, or a whole response (a refusal).
Answer = bytes | web.Response
FakeServer = Callable[[Sequence[Answer]], Awaitable[str]]


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    """Start a server that answers the reinit path with the given answers, one per request,
    in order; the last stream stays open. Returns its base URL."""
    servers: list[TestServer] = []

    async def start(answers: Sequence[Answer]) -> str:
        remaining = list(answers)

        async def handler(request: web.Request) -> web.StreamResponse:
            answer = remaining.pop(0) if remaining else b""
            if isinstance(answer, web.Response):
                return answer
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(answer)
            if not remaining:
                await asyncio.sleep(3600)  # the last stream stays open until the test ends
            return response

        app = web.Application()
        app.router.add_get(REINIT_PATH, handler)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()
